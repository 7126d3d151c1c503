DROP TRIGGER IF EXISTS cmbagent_db_approval_deleted ON approval_requests;
DROP FUNCTION IF EXISTS cmbagent_db_notify_approval_deleted();

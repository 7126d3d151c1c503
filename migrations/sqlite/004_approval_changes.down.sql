DROP TRIGGER IF EXISTS cmbagent_db_approval_deleted;
DROP TRIGGER IF EXISTS cmbagent_db_approval_status;
DROP TABLE IF EXISTS cmbagent_db_approval_changes;

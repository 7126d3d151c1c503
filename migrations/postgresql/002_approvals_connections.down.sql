DROP TABLE IF EXISTS active_connections;
DROP TABLE IF EXISTS approval_requests;
DROP FUNCTION IF EXISTS cmbagent_db_notify_approval();

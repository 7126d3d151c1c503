DROP TABLE IF EXISTS active_connections;
DROP TABLE IF EXISTS approval_requests;

DROP TABLE active_connections;
DROP TABLE approval_requests;

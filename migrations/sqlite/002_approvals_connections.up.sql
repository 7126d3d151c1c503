-- 002_approvals_connections: Stage 2, durable approvals and connection presence.
-- One index per purpose: (run_id, status) also serves lookups by run_id alone; the
-- pending-expiry index is partial, so an expiry sweep never reads resolved rows; the
-- unique index on task_id is the only index on it.
CREATE TABLE approval_requests (
    id VARCHAR(36) NOT NULL,
    run_id VARCHAR(36) NOT NULL,
    session_id VARCHAR(36),
    approval_type VARCHAR(50) NOT NULL,
    context JSON NOT NULL,
    status VARCHAR(20) DEFAULT 'pending',
    resolution VARCHAR(20),
    result JSON,
    created_at TIMESTAMP DEFAULT (CURRENT_TIMESTAMP),
    expires_at TIMESTAMP NOT NULL,
    resolved_at TIMESTAMP,
    PRIMARY KEY (id),
    FOREIGN KEY (run_id) REFERENCES workflow_runs (id) ON DELETE CASCADE,
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE SET NULL
);
CREATE INDEX idx_approval_run_status ON approval_requests (run_id, status);
CREATE INDEX idx_approval_session_id ON approval_requests (session_id);
CREATE INDEX idx_approval_expires ON approval_requests (expires_at) WHERE status = 'pending';

CREATE TABLE active_connections (
    id VARCHAR(36) NOT NULL,
    task_id VARCHAR(100) NOT NULL,
    session_id VARCHAR(36),
    server_instance VARCHAR(100),
    connected_at TIMESTAMP DEFAULT (CURRENT_TIMESTAMP),
    last_heartbeat TIMESTAMP DEFAULT (CURRENT_TIMESTAMP),
    PRIMARY KEY (id),
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE SET NULL
);
CREATE UNIQUE INDEX idx_connection_task_id ON active_connections (task_id);
CREATE INDEX idx_connection_session_id ON active_connections (session_id);
CREATE INDEX idx_connection_heartbeat ON active_connections (last_heartbeat);

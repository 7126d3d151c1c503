-- 000_base: sessions and workflow_runs.
-- IF NOT EXISTS: a database whose tables cmbagent's SQLAlchemy models already created is
-- adopted as it is, keeping every row. Single-column indexes carry SQLAlchemy's
-- index=True names (ix_<table>_<column>) so an adopted database gains no duplicates.
CREATE TABLE IF NOT EXISTS sessions (
    id VARCHAR(36) NOT NULL,
    user_id VARCHAR(36),
    name VARCHAR(255) NOT NULL,
    created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    last_active_at TIMESTAMP WITHOUT TIME ZONE NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    status VARCHAR(50) NOT NULL DEFAULT 'active',
    meta JSON,
    resource_limits JSON,
    PRIMARY KEY (id)
);
CREATE INDEX IF NOT EXISTS ix_sessions_user_id ON sessions (user_id);
CREATE INDEX IF NOT EXISTS ix_sessions_status ON sessions (status);
CREATE INDEX IF NOT EXISTS idx_sessions_user_status ON sessions (user_id, status);

CREATE TABLE IF NOT EXISTS workflow_runs (
    id VARCHAR(36) NOT NULL,
    session_id VARCHAR(36) NOT NULL,
    project_id VARCHAR(36),
    mode VARCHAR(50) NOT NULL DEFAULT 'one_shot',
    agent VARCHAR(100) NOT NULL DEFAULT 'engineer',
    model VARCHAR(100) NOT NULL DEFAULT 'gpt-4o',
    status VARCHAR(50) NOT NULL DEFAULT 'draft',
    started_at TIMESTAMP WITHOUT TIME ZONE,
    completed_at TIMESTAMP WITHOUT TIME ZONE,
    last_heartbeat_at TIMESTAMP WITHOUT TIME ZONE,
    checkpoint_frequency_minutes INTEGER NOT NULL DEFAULT 10,
    task_description TEXT,
    meta JSON,
    branch_parent_id VARCHAR(36),
    is_branch BOOLEAN NOT NULL DEFAULT false,
    branch_depth INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (id),
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE,
    FOREIGN KEY (branch_parent_id) REFERENCES workflow_runs (id) ON DELETE SET NULL
);
CREATE INDEX IF NOT EXISTS ix_workflow_runs_session_id ON workflow_runs (session_id);
CREATE INDEX IF NOT EXISTS ix_workflow_runs_mode ON workflow_runs (mode);
CREATE INDEX IF NOT EXISTS ix_workflow_runs_agent ON workflow_runs (agent);
CREATE INDEX IF NOT EXISTS ix_workflow_runs_status ON workflow_runs (status);
CREATE INDEX IF NOT EXISTS ix_workflow_runs_branch_parent_id ON workflow_runs (branch_parent_id);
CREATE INDEX IF NOT EXISTS idx_workflow_runs_session_status ON workflow_runs (session_id, status);
CREATE INDEX IF NOT EXISTS idx_workflow_runs_agent_status ON workflow_runs (agent, status);

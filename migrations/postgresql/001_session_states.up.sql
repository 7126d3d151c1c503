-- 001_session_states: Stage 1's per-session state. IF NOT EXISTS adopts a table that
-- SQLAlchemy's create_all made before this database had migrations.
CREATE TABLE IF NOT EXISTS session_states (
    id VARCHAR(36) NOT NULL,
    session_id VARCHAR(36) NOT NULL,
    mode VARCHAR(50) NOT NULL,
    conversation_history JSON,
    context_variables JSON,
    plan_data JSON,
    current_phase VARCHAR(50),
    current_step INTEGER,
    status VARCHAR(20) DEFAULT 'active',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT now(),
    expires_at TIMESTAMP WITH TIME ZONE,
    version INTEGER DEFAULT 1,
    PRIMARY KEY (id),
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS ix_session_states_session_id ON session_states (session_id);
CREATE INDEX IF NOT EXISTS ix_session_states_status ON session_states (status);
CREATE INDEX IF NOT EXISTS idx_session_states_session_status ON session_states (session_id, status);
CREATE INDEX IF NOT EXISTS ix_session_states_mode ON session_states (mode);
CREATE INDEX IF NOT EXISTS ix_session_states_updated_at ON session_states (updated_at);

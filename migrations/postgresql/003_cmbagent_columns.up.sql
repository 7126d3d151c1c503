-- 003_cmbagent_columns: the columns cmbagent's models declare beyond durable approvals.
-- workflow_runs: the task hierarchy (a stage's run points at its task's run).
-- approval_requests: the columns of cmbagent's first approval table, kept so its rows
-- stay readable.
ALTER TABLE workflow_runs
    ADD COLUMN parent_run_id VARCHAR(36) REFERENCES workflow_runs (id) ON DELETE SET NULL,
    ADD COLUMN stage_number INTEGER,
    ADD COLUMN stage_name VARCHAR(100);
CREATE INDEX ix_workflow_runs_parent_run_id ON workflow_runs (parent_run_id);

ALTER TABLE approval_requests
    ADD COLUMN step_id VARCHAR(36),
    ADD COLUMN requested_at TIMESTAMP WITHOUT TIME ZONE,
    ADD COLUMN context_snapshot JSON,
    ADD COLUMN user_feedback TEXT;

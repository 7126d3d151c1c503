ALTER TABLE approval_requests
    DROP COLUMN IF EXISTS user_feedback,
    DROP COLUMN IF EXISTS context_snapshot,
    DROP COLUMN IF EXISTS requested_at,
    DROP COLUMN IF EXISTS step_id;
DROP INDEX IF EXISTS ix_workflow_runs_parent_run_id;
ALTER TABLE workflow_runs
    DROP COLUMN IF EXISTS stage_name,
    DROP COLUMN IF EXISTS stage_number,
    DROP COLUMN IF EXISTS parent_run_id;

-- 004_approval_changes: a deleted approval request NOTIFYs its id on cmbagent_db_approvals
-- too, as a change of its status does (approval_notify.sql), so its waiters hear at once
-- that it is gone.
CREATE OR REPLACE FUNCTION cmbagent_db_notify_approval_deleted() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('cmbagent_db_approvals', OLD.id);
    RETURN OLD;
END
$$ LANGUAGE plpgsql;
CREATE OR REPLACE TRIGGER cmbagent_db_approval_deleted
    AFTER DELETE ON approval_requests FOR EACH ROW
    EXECUTE FUNCTION cmbagent_db_notify_approval_deleted();

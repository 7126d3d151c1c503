-- Every change of an approval request's status, by whatever client, NOTIFYs its id on
-- cmbagent_db_approvals: waiters LISTEN there instead of polling.
CREATE OR REPLACE FUNCTION cmbagent_db_notify_approval() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('cmbagent_db_approvals', NEW.id);
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
CREATE OR REPLACE TRIGGER cmbagent_db_approval_status
    AFTER UPDATE OF status ON approval_requests FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION cmbagent_db_notify_approval();

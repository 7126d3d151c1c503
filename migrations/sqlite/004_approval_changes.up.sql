-- 004_approval_changes: a log of the approval requests whose status (or id) changed or
-- that were deleted, by whatever client. A SQLite commit says nothing of what it changed:
-- a waiting process reads the ids logged since it last looked instead of every request
-- it watches.
-- seq is the rowid: one more than the newest entry, so entries are numbered without gaps
-- in commit order (SQLite has one writer). Each insert keeps the newest 10,000 entries: a
-- reader that fell further behind sees the gap and reads every request it watches.
-- (AUTOINCREMENT would add a write of sqlite_sequence to every status change.)
CREATE TABLE cmbagent_db_approval_changes (
    seq INTEGER PRIMARY KEY,
    request_id VARCHAR(36) NOT NULL
);
CREATE TRIGGER cmbagent_db_approval_status
    AFTER UPDATE OF id, status ON approval_requests
    WHEN OLD.status IS NOT NEW.status OR OLD.id IS NOT NEW.id
BEGIN
    INSERT INTO cmbagent_db_approval_changes (request_id)
        SELECT NEW.id UNION ALL SELECT OLD.id WHERE OLD.id IS NOT NEW.id;
    DELETE FROM cmbagent_db_approval_changes WHERE seq <= last_insert_rowid() - 10000;
END;
CREATE TRIGGER cmbagent_db_approval_deleted
    AFTER DELETE ON approval_requests
BEGIN
    INSERT INTO cmbagent_db_approval_changes (request_id) VALUES (OLD.id);
    DELETE FROM cmbagent_db_approval_changes WHERE seq <= last_insert_rowid() - 10000;
END;

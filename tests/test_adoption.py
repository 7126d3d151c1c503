"""Opening the databases cmbagent already has: its first approval table, today's
``create_all``, and databases its own Alembic chain migrated (tests/cmbagent_databases.py
builds each). Every row stays, every foreign key of cmbagent's other tables stays valid,
cmbagent's ``alembic_version`` is left as it was, and a table of another shape is refused
before anything changes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import MetaData, select

import cmbagent_db
import cmbagent_databases as cmb
from cmbagent_db import approvals, connections
from cmbagent_db.models import ApprovalRequest, WorkflowRun
from helpers import alembic_config, connected, fetch_all, is_sqlite, row_count, table_names

UTC = timezone.utc
HEAD = cmbagent_db.history()[-1]
NO_DEADLINE = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
OTHER_TABLES = ["projects", "workflow_steps", "dag_nodes", "cost_records"]


def counts(url):
    return {t: row_count(url, t) for t in sorted(table_names(url))}


def rows_of(url, table):
    """Every row of ``table`` as SQLAlchemy reads it, keyed by primary key."""
    e = cmb.engine(url)
    try:
        md = MetaData()
        md.reflect(e, only=[table])
        t = md.tables[table]
        with e.connect() as conn:
            return {r[0]: dict(r._mapping) for r in conn.execute(select(t)).all()}
    finally:
        e.dispose()


def foreign_keys(url):
    """Every (table, column, parent table) foreign key, and whether all rows satisfy them
    (SQLite's foreign_key_check; PostgreSQL checks each row as it is written, so a
    validated constraint holds)."""
    if is_sqlite(url):
        keys = set()
        for t in table_names(url):
            for r in fetch_all(url, f'PRAGMA foreign_key_list("{t}")'):
                keys.add((t, r[3], r[2]))
        return keys, fetch_all(url, "PRAGMA foreign_key_check") == []
    rows = fetch_all(
        url,
        "SELECT c.conrelid::regclass::text, a.attname, c.confrelid::regclass::text, c.convalidated "
        "FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid "
        "AND a.attnum = c.conkey[1] WHERE c.contype = 'f'")
    return {(t, col, parent) for t, col, parent, _ in rows}, all(r[3] for r in rows)


def assert_foreign_keys_kept(url, before):
    keys, hold = foreign_keys(url)
    assert before <= keys, before - keys
    assert hold


def naive(v):
    return v.replace(tzinfo=None) if v is not None and v.tzinfo else v


# ------------------------------------------------------------------- the legacy table


def test_legacy_database_opens_with_every_row(db_url):
    written = cmb.build(db_url, "legacy")
    before = counts(db_url)
    keys, _ = foreign_keys(db_url)
    other_before = {t: rows_of(db_url, t) for t in OTHER_TABLES + ["workflow_runs"]}

    db = cmbagent_db.get_db_session(db_url)
    try:
        got = {a.id: a for a in db.query(ApprovalRequest).all()}
        assert sorted(got) == sorted(a["id"] for a in written["approvals"])
        for w in written["approvals"]:
            a = got[w["id"]]
            # Legacy values, as they were.
            assert a.status == w["status"]
            assert a.step_id == w["step_id"]
            assert a.requested_at == w["requested_at"].replace(tzinfo=UTC)
            assert a.context_snapshot == w["context_snapshot"]
            assert a.user_feedback == w["user_feedback"]
            assert a.resolution == w["resolution"]
            assert naive(a.resolved_at) == w["resolved_at"]
            # The columns the legacy table lacked.
            assert a.approval_type == "legacy"
            assert a.context == (w["context_snapshot"] or {})
            assert a.expires_at == NO_DEADLINE
            assert a.created_at == w["requested_at"].replace(tzinfo=UTC)
            assert a.session_id is None
            d = a.to_dict()
            assert d["step_id"] == "st1" and d["status"] == w["status"]
            assert d["expires_at"] == NO_DEADLINE.isoformat()
        runs = {r.id: r for r in db.query(WorkflowRun).all()}
        assert runs["r2"].branch_parent_id == "r1" and runs["r2"].parent_run_id is None
        assert db.query(WorkflowRun).filter(WorkflowRun.parent_run_id.is_(None)).count() == 2
    finally:
        db.close()

    after = counts(db_url)
    assert {t: after[t] for t in before} == before
    for t, rows in other_before.items():
        now = rows_of(db_url, t)
        for key, row in rows.items():
            assert {k: now[key][k] for k in row} == row, t
    assert_foreign_keys_kept(db_url, keys)
    assert cmbagent_db.current(db_url) == HEAD
    assert cmbagent_db.foreign_revisions(db_url) == []


def test_legacy_rows_through_the_approval_services(db_url):
    cmb.build(db_url, "legacy")
    db = cmbagent_db.get_db_session(db_url)
    try:
        # Decided rows are final: never resolved again, never cancelled, never expired.
        for status in ["approved", "rejected", "modified"]:
            assert approvals.resolve(db, f"legacy-{status}", "approved") is False
            assert approvals.cancel(db, f"legacy-{status}") is False
        assert approvals.expire_overdue(db) == []
        # The legacy pending request has no deadline: it waits for a human, as before.
        assert [a.id for a in approvals.pending(db)] == ["legacy-pending"]
        assert approvals.resolve(db, "legacy-pending", "approved", {"by": "me"}) is True
        assert approvals.resolve(db, "legacy-pending", "rejected") is False
    finally:
        db.close()
    # A waiter on a decided legacy row returns it at once.
    done = approvals.wait("legacy-approved", timeout=5, url=db_url)
    assert done.status == "approved" and done.resolution == "approved"
    done = approvals.wait("legacy-pending", timeout=5, url=db_url)
    assert done.status == "resolved" and done.result == {"by": "me"}


# ------------------------------------------------------------ today's create_all


def test_current_create_all_database_opens_unchanged(db_url):
    written = cmb.build(db_url, "current")
    before = counts(db_url)
    keys, _ = foreign_keys(db_url)
    every = {t: rows_of(db_url, t) for t in table_names(db_url)}

    assert cmbagent_db.init_database(db_url) == HEAD
    after = counts(db_url)
    assert {t: after[t] for t in before} == before
    for t, rows in every.items():
        assert rows_of(db_url, t) == rows, t
    assert_foreign_keys_kept(db_url, keys)

    db = cmbagent_db.get_db_session(db_url)
    try:
        a = db.get(ApprovalRequest, "today-pending")
        assert a.to_dict() == {
            "id": "today-pending", "run_id": "r1", "session_id": "s1", "step_id": "st1",
            "approval_type": "plan_approval", "context": {"plan": "p"}, "status": "pending",
            "resolution": None, "result": None, "created_at": a.created_at.isoformat(),
            "expires_at": "2099-01-01T00:00:00+00:00", "resolved_at": None,
        }
        r2 = db.get(WorkflowRun, "r2")
        assert (r2.parent_run_id, r2.stage_number, r2.stage_name) == ("r1", 2, "planning")
        # cmbagent's unique index on task_id serves the heartbeat's upsert.
        beat = connections.heartbeat(db, "task-1", server_instance="i2")
        assert (beat.id, beat.server_instance, beat.session_id) == ("c1", "i2", "s1")
        assert [x.id for x in db.query(WorkflowRun).filter(WorkflowRun.parent_run_id.is_(None))] == ["r1"]
    finally:
        db.close()
    assert len(written["approvals"]) == 2


def test_indexes_after_adopting_create_all(db_url):
    from helpers import index_info

    cmb.build(db_url, "current")
    cmbagent_db.init_database(db_url)
    idx = index_info(db_url, "approval_requests", include_constraints=False)
    # The pending-expiry index is partial now; cmbagent's other indexes are still there.
    assert idx["idx_approval_expires"]["partial"], idx
    for name in ["idx_approval_run_status", "idx_approval_session", "idx_approval_status"]:
        assert name in idx, idx
    # No second index on a column cmbagent already indexes.
    on_session = [n for n, v in idx.items() if v["columns"] == ["session_id"]]
    assert "idx_approval_session_id" not in on_session, on_session


# ------------------------------------------------------------ cmbagent's Alembic chain


def test_cmbagent_chain_database_keeps_its_alembic_version(db_url, tmp_path, capsys):
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    written = cmb.build(db_url, "chain")
    before = counts(db_url)
    assert before["approval_requests"] == len(written["approvals"])
    keys, _ = foreign_keys(db_url)
    assert cmbagent_db.init_database(db_url) == HEAD
    assert fetch_all(db_url, "SELECT version_num FROM alembic_version") == [(cmb.CMBAGENT_HEAD,)]
    assert fetch_all(db_url, "SELECT version_num FROM cmbagent_db_version") == [(HEAD,)]
    assert cmbagent_db.current(db_url) == HEAD
    assert cmbagent_db.foreign_revisions(db_url) == [cmb.CMBAGENT_HEAD]
    after = counts(db_url)
    assert {t: after[t] for t in before} == before

    # cmbagent's own Alembic still reads and runs its chain on the database.
    cfg = alembic_config(tmp_path, db_url, [(cmb.CMBAGENT_HEAD, None)])
    command.upgrade(cfg, "head")
    e = cmb.engine(db_url)
    with e.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == cmb.CMBAGENT_HEAD
    e.dispose()

    db = cmbagent_db.get_db_session(db_url)
    try:
        for w in written["approvals"]:
            a = db.get(ApprovalRequest, w["id"])
            assert a.status == w["status"] and a.approval_type == "legacy"
            assert a.expires_at == NO_DEADLINE and a.to_dict()["id"] == w["id"]
        # The chain's UNIQUE constraint on task_id serves the heartbeat's upsert.
        first = connections.heartbeat(db, "task-9", server_instance="i1")
        again = connections.heartbeat(db, "task-9", server_instance="i2")
        assert first.id == again.id and again.server_instance == "i2"
    finally:
        db.close()
    assert_foreign_keys_kept(db_url, keys)

    from cmbagent_db import cli

    assert cli.main(["--url", db_url, "current"]) == 0
    out = capsys.readouterr().out
    assert f"{HEAD} (head)" in out and cmb.CMBAGENT_HEAD in out
    assert cli.main(["--url", db_url, "check"]) == 0
    assert cmb.CMBAGENT_HEAD in capsys.readouterr().out


def test_an_older_cmbagent_revision_is_refused_until_its_chain_runs(db_url):
    cmb.build(db_url, "legacy")
    cmb.set_alembic_version(db_url, cmb.BEFORE_APPROVALS)
    before = {t: rows_of(db_url, t) for t in table_names(db_url)}
    with pytest.raises(cmbagent_db.MigrationError) as err:
        cmbagent_db.get_db_session(db_url)
    message = str(err.value)
    assert cmb.APPROVALS_REVISION in message and "approval_requests.session_id" in message
    assert "alembic upgrade head" in message and "nothing was changed" in message
    assert {t: rows_of(db_url, t) for t in table_names(db_url)} == before


# ------------------------------------------------------------ shapes that are refused


@pytest.mark.parametrize("shape", ["missing_run_id", "unrelated", "view"])
def test_a_table_of_another_shape_is_refused_before_anything_changes(db_url, shape):
    cmb.build(db_url, "legacy")
    e = cmb.engine(db_url)
    with e.begin() as conn:
        conn.exec_driver_sql("DROP TABLE approval_requests")
        if shape == "missing_run_id":
            conn.exec_driver_sql(
                "CREATE TABLE approval_requests (id VARCHAR(36) PRIMARY KEY, status VARCHAR(20), "
                "context JSON, expires_at TIMESTAMP)")
        elif shape == "unrelated":
            conn.exec_driver_sql(
                "CREATE TABLE approval_requests (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, "
                "title TEXT)")
        else:
            conn.exec_driver_sql("CREATE VIEW approval_requests AS SELECT id FROM sessions")
    e.dispose()
    before = {t: rows_of(db_url, t) for t in table_names(db_url)}
    with pytest.raises(cmbagent_db.MigrationError) as err:
        cmbagent_db.init_database(db_url)
    message = str(err.value)
    assert "approval_requests exists but is not a table this package can adopt" in message
    assert "nothing was changed" in message
    expected = {
        "missing_run_id": "no column run_id",
        "unrelated": "column id is",
        "view": "not a table",
    }[shape]
    assert expected in message, message
    assert {t: rows_of(db_url, t) for t in table_names(db_url)} == before
    assert "alembic_version" not in table_names(db_url)


# ------------------------------------------------------------ today's columns, plain attributes


def test_today_columns_and_plain_attributes(migrated_url):
    db = cmbagent_db.get_db_session(migrated_url)
    try:
        from cmbagent_db.models import Session

        s = Session(name="n")
        run = WorkflowRun(session_id=s.id)
        child = WorkflowRun(session_id=s.id, parent_run_id=run.id, stage_number=1,
                            stage_name="idea_generation")
        db.add_all([s, run, child])
        db.flush()
        a = ApprovalRequest.create_pending(run.id, "step_approval", {"x": 1}, step_id="step-7")
        # A name that is not a column is a plain attribute: set, read, never written.
        setattr(run, "error", "boom")
        for k, v in {"status": "failed", "note": "kept in Python"}.items():
            setattr(run, k, v)
        db.add(a)
        db.commit()
        assert run.error == "boom" and run.note == "kept in Python"
        assert a.to_dict()["step_id"] == "step-7"
    finally:
        db.close()
    db = cmbagent_db.get_db_session(migrated_url)
    try:
        fresh = db.query(WorkflowRun).filter(WorkflowRun.id == run.id).populate_existing().one()
        assert fresh.status == "failed"
        assert not hasattr(fresh, "error")
        assert db.get(WorkflowRun, child.id).stage_name == "idea_generation"
        assert db.query(WorkflowRun).filter(WorkflowRun.parent_run_id.is_(None)).count() == 1
        assert db.get(ApprovalRequest, a.id).step_id == "step-7"
    finally:
        db.close()


# ------------------------------------------------------------ a kill during adoption


KILLER = """
import sys, time, cmbagent_db
print("start", flush=True)
t = time.monotonic()
cmbagent_db.init_database(sys.argv[1])
print(time.monotonic() - t, flush=True)
"""


def test_sigkill_during_adoption_leaves_one_shape_with_every_row(sqlite_url, tmp_path):
    import shutil
    from helpers import sqlite_path

    cmb.build(sqlite_url, "legacy")
    e = cmb.engine(sqlite_url)
    with e.begin() as conn:
        conn.exec_driver_sql(
            "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 40000) "
            "INSERT INTO approval_requests (id, run_id, step_id, status, requested_at, "
            "context_snapshot) SELECT 'bulk-' || i, 'r1', 'st1', 'approved', "
            "'2025-01-01 00:00:00.000000', '{\"i\": ' || i || '}' FROM k")
    e.dispose()
    total = row_count(sqlite_url, "approval_requests")
    script = tmp_path / "adopt.py"
    script.write_text(KILLER)
    path = sqlite_path(sqlite_url)

    def fresh_copy(name):
        copy = str(tmp_path / name)
        shutil.copy(path, copy)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                shutil.copy(path + suffix, copy + suffix)
        return f"sqlite:///{copy}"

    # One undisturbed run tells how long adoption takes here.
    probe = subprocess.run([sys.executable, str(script), fresh_copy("probe.db")], check=True,
                           capture_output=True, text=True)
    adoption = float(probe.stdout.split()[-1])
    kept_old = 0
    for i, fraction in enumerate((0.1, 0.3, 0.5, 0.7, 0.9, 1.5)):
        url = fresh_copy(f"try{i}.db")
        proc = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "start"
        time.sleep(adoption * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cols = [r[1] for r in fetch_all(url, "PRAGMA table_info(approval_requests)")]
        assert fetch_all(url, "PRAGMA integrity_check") == [("ok",)]
        assert row_count(url, "approval_requests") == total
        assert fetch_all(url, "PRAGMA foreign_key_check") == []
        if "approval_type" in cols:
            assert fetch_all(url, "SELECT count(*) FROM approval_requests WHERE approval_type = 'legacy'") == [(total,)]
        else:
            kept_old += 1
            assert fetch_all(url, "SELECT count(*) FROM approval_requests WHERE step_id = 'st1'") == [(total,)]
        # Whatever was left, the next start finishes the job.
        assert cmbagent_db.init_database(url) == HEAD
        assert row_count(url, "approval_requests") == total
        cmbagent_db.dispose_engines()
    # Kills inside the adoption left the old table whole at least once.
    assert kept_old >= 1


def _legacy_with_many_approvals(url, n):
    cmb.build(url, "legacy")
    e = cmb.engine(url)
    with e.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO approval_requests (id, run_id, step_id, status, requested_at, "
            "context_snapshot) SELECT 'bulk-' || i, 'r1', 'st1', 'approved', "
            "TIMESTAMP '2025-01-01 00:00:00', json_build_object('i', i) "
            f"FROM generate_series(1, {n}) AS i")
    e.dispose()
    return row_count(url, "approval_requests")


def _terminate_others(url):
    """Ends every other backend on the test database (the adopting process's)."""
    with connected(url) as conn:
        cur = conn.cursor()
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        return sum(1 for (ok,) in cur.fetchall() if ok)


def test_postgresql_backend_ended_during_adoption_leaves_one_shape(new_db_url, tmp_path):
    script = tmp_path / "adopt.py"
    script.write_text(KILLER)
    probe = new_db_url("postgresql")
    total = _legacy_with_many_approvals(probe, 40000)
    out = subprocess.run([sys.executable, str(script), probe], check=True,
                         capture_output=True, text=True).stdout
    adoption = float(out.split()[-1])
    kept_old = 0
    for fraction in (0.2, 0.5, 0.8):
        url = new_db_url("postgresql")
        assert _legacy_with_many_approvals(url, 40000) == total
        proc = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "start"
        time.sleep(adoption * fraction)
        # The engine retries once on a new connection when the server drops one; the
        # second termination ends that retry too.
        ended = _terminate_others(url)
        time.sleep(adoption * 0.3)
        ended += _terminate_others(url)
        _, err = proc.communicate(timeout=60)
        cols = {r[0] for r in fetch_all(
            url, "SELECT column_name FROM information_schema.columns "
                 "WHERE table_schema = current_schema() AND table_name = 'approval_requests'")}
        assert row_count(url, "approval_requests") == total
        if "approval_type" in cols:
            assert fetch_all(url, "SELECT count(*) FROM approval_requests "
                                  "WHERE approval_type = 'legacy'") == [(total,)]
        else:
            assert ended and "OperationalError" in err, err
            kept_old += 1
            assert fetch_all(url, "SELECT count(*) FROM approval_requests "
                                  "WHERE requested_at IS NOT NULL") == [(total,)]
        assert cmbagent_db.init_database(url) == HEAD
        assert row_count(url, "approval_requests") == total
        cmbagent_db.dispose_engines()
    assert kept_old >= 1

"""PostgreSQL behind PgBouncer in transaction mode, the pooler deployments of several
instances put in front of the server (a real ``pgbouncer``, started by conftest.py's
``pgbouncer`` fixture with 4 server connections per database).

A pooler in transaction mode hands each transaction whichever server connection is free
(PgBouncer takes the one used last), so nothing a connection prepared or set outside a
transaction may be counted on in the next. The tests make the server connection change
between two transactions of one client on purpose: another client holds the one it used
last in an open transaction.

- sessions, migrations, approvals and presence work through the pooler from many threads,
  with ``prepared_statements`` left at ``auto`` (the pooler is recognised), and the same
  URL with ``prepared_statements=true`` fails as a cached statement must;
- the DB-API describes result columns of a query that returned no rows and counts changed
  rows, in and out of a transaction;
- ``approvals.wait`` works with the pooled URL alone (it reads the row every poll slice,
  as LISTEN cannot go through the pooler), and LISTENs on the server directly when
  ``CMBAGENT_DATABASE_LISTEN_URL`` names it for cmbagent's database.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from typing import Any, Callable, Iterator, List

import psycopg2
import pytest

import cmbagent_db
from cmbagent_db import ProgrammingError, approvals, connections, dbapi, get_db_session
from cmbagent_db.models import ApprovalRequest, Session, WorkflowRun

from helpers import pg_dsn


@pytest.fixture
def pooled(pg_url: str, pgbouncer: Any) -> Iterator[str]:
    """The URL of a fresh database through PgBouncer."""
    name = pg_url.rsplit("/", 1)[1]
    yield pgbouncer.url_for(name)
    cmbagent_db.dispose_engines()  # the database is dropped next


def seed_run(db: Any) -> str:
    sid, rid = str(uuid.uuid4()), str(uuid.uuid4())
    db.add(Session(id=sid, name="pooled", status="active"))
    db.add(WorkflowRun(id=rid, session_id=sid, mode="one_shot", agent="engineer",
                       model="gpt-4o", status="running"))
    db.commit()
    return rid


def hold_last_server_connection(url: str) -> psycopg2.extensions.connection:
    """A client of the pooler in an open transaction: it holds the server connection the
    pooler would otherwise hand the next transaction (the last one used)."""
    holder = psycopg2.connect(pg_dsn(url))
    holder.cursor().execute("SELECT 1")  # psycopg2 opened a transaction: it stays open
    return holder


def test_sessions_migrations_and_services_from_many_threads_through_pgbouncer(
        pooled: str, pg_url: str) -> None:
    db = get_db_session(pooled)  # migrates the new database through the pooler
    rid = seed_run(db)
    db.close()
    errors: List[BaseException] = []
    done: List[str] = []

    def work(n: int) -> None:
        try:
            for i in range(15):
                s = get_db_session(pooled)
                try:
                    req = approvals.request(s, rid, "plan_approval", {"n": n, "i": i})
                    got = s.query(ApprovalRequest).filter(ApprovalRequest.id == req.id).one()
                    assert got.context == {"n": n, "i": i}
                    assert approvals.resolve(s, req.id, "approved", {"by": n})
                    connections.heartbeat(s, f"task-{n}", server_instance="pooled")
                    done.append(req.id)
                finally:
                    s.close()
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg2.connect(pg_dsn(pg_url)) as direct:
        cur = direct.cursor()
        cur.execute("SELECT count(*) FROM approval_requests WHERE status = 'resolved'")
        assert cur.fetchone()[0] == len(done) == 8 * 15
        cur.execute("SELECT count(*) FROM active_connections")
        assert cur.fetchone()[0] == 8


@pytest.mark.parametrize("setting", ["auto", "false", "true"])
def test_a_server_connection_change_between_transactions(pooled: str, setting: str) -> None:
    url = f"{pooled}?prepared_statements={setting}"
    db = get_db_session(url)
    rid = seed_run(db)
    first = approvals.request(db, rid, "plan_approval", {"step": 1})
    holder = hold_last_server_connection(pooled)
    try:
        if setting == "true":
            # A statement cached on the first server connection is not on this one.
            with pytest.raises(ProgrammingError, match="does not exist"):
                approvals.request(db, rid, "plan_approval", {"step": 2})
            db.rollback()
        else:
            second = approvals.request(db, rid, "plan_approval", {"step": 2})
            ids = {r.id for r in approvals.pending(db, run_id=rid)}
            assert ids == {first.id, second.id}
    finally:
        holder.close()
        db.close()


def test_the_dbapi_describes_and_counts_through_pgbouncer(pooled: str) -> None:
    get_db_session(pooled).close()  # the schema
    for autocommit in (False, True):
        conn = dbapi.connect(pooled, autocommit=autocommit)
        holder = hold_last_server_connection(pooled)
        try:
            cur = conn.cursor()
            cur.execute("SELECT id, status, created_at FROM approval_requests WHERE id = $1",
                        ("missing",))
            assert [d[0] for d in cur.description] == ["id", "status", "created_at"]
            assert cur.fetchall() == []
            cur.execute("INSERT INTO sessions (id, name, status) VALUES ($1, $2, $3)",
                        (f"s-{autocommit}", "dbapi", "active"))
            assert cur.rowcount == 1
            assert cur.description is None
            cur.execute("UPDATE sessions SET status = $1 WHERE id = $2",
                        ("done", f"s-{autocommit}"))
            assert cur.rowcount == 1
            cur.execute("SELECT name FROM sessions WHERE id = $1", (f"s-{autocommit}",))
            assert cur.fetchall() == [("dbapi",)]
            conn.commit()
            with pytest.raises(ProgrammingError, match="parameters"):
                cur.execute("SELECT name FROM sessions WHERE id = $1 AND name = $2", ("x",))
            conn.rollback()
        finally:
            holder.close()
            conn.close()
    check = dbapi.connect(pooled)
    cur = check.cursor()
    cur.execute("SELECT count(*) FROM sessions WHERE status = 'done'")
    assert cur.fetchone() == (2,)
    check.close()


def waited(url: str, resolve: Callable[[str], None], rid: str, db: Any) -> float:
    """Seconds from resolving a request to its waiter's wake-up."""
    req = approvals.request(db, rid, "plan_approval", {"plan": "p"})
    woke: List[float] = []

    def wait() -> None:
        approvals.wait(req.id, timeout=30, url=url)
        woke.append(time.monotonic())

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)  # the waiter has read the row once
    at = time.monotonic()
    resolve(req.id)
    t.join(30)
    assert woke, "the waiter did not wake"
    return woke[0] - at


def test_wait_with_the_pooled_url_alone(pooled: str) -> None:
    db = get_db_session(pooled)
    rid = seed_run(db)
    lags = [waited(pooled, lambda i: approvals.resolve(db, i, "approved"), rid, db)
            for _ in range(5)]
    # One read per 50 ms poll slice: woken well within 100 ms at the median.
    assert statistics.median(lags) < 0.1, lags
    db.close()


def test_wait_listens_on_the_listen_url(pooled: str, pg_url: str, pg_server: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    app = f"listener-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("CMBAGENT_DATABASE_URL", pooled)
    monkeypatch.setenv("CMBAGENT_DATABASE_LISTEN_URL", f"{pg_url}?application_name={app}")
    db = get_db_session(pooled)
    rid = seed_run(db)
    seen: List[int] = []

    def resolve(i: str) -> None:
        # The waiter's connection is the direct one, named by the listen URL.
        seen.append(pg_server.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,))[0][0])
        approvals.resolve(db, i, "approved")

    lags = [waited(None, resolve, rid, db) for _ in range(3)]  # type: ignore[arg-type]
    assert seen == [1, 1, 1]
    assert max(lags) < 1.0, lags
    db.close()


def test_a_bad_listen_url_is_a_clear_error(pooled: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMBAGENT_DATABASE_URL", pooled)
    monkeypatch.setenv("CMBAGENT_DATABASE_LISTEN_URL", "sqlite:///elsewhere.db")
    with pytest.raises(cmbagent_db.InterfaceError, match="CMBAGENT_DATABASE_LISTEN_URL"):
        approvals.wait("any", timeout=1)


@pytest.mark.parametrize("setting,cached", [("auto", True), ("true", True), ("false", False)])
def test_a_direct_connection_keeps_prepared_statements_unless_told(
        pg_url: str, setting: str, cached: bool) -> None:
    conn = dbapi.connect(f"{pg_url}?prepared_statements={setting}")
    try:
        cur = conn.cursor()
        cur.execute("SELECT $1::int + 1", (1,))
        assert cur.fetchall() == [(2,)]
        # The server's list of this session's prepared statements.
        cur.execute("SELECT count(*) FROM pg_prepared_statements")
        assert (cur.fetchone()[0] > 0) == cached
    finally:
        conn.close()

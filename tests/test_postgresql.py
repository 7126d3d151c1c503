"""PostgreSQL-specific behaviour, against the throwaway server of conftest.py.

- a session whose server backend is killed (``pg_terminate_backend``) mid-transaction gets an
  OperationalError, can be rolled back and used again, and the pool never hands out a dead
  connection;
- connection errors are OperationalError naming host and database, never the password;
- a server that accepts TCP and never answers costs ``connect_timeout`` (10 s by default),
  and one that stops answering mid-statement costs ``command_timeout`` (a waiter's
  connection bounds its statements by the connect timeout unless told otherwise);
- every URL spelling cmbagent users have works, with libpq query parameters;
- the catalogue shows the partial index, timestamptz / timestamp and json as SCHEMA.md says;
- several processes running ``migrate(url, "head")`` at the same moment all succeed and the
  database is migrated exactly once.

Everything checked here is read back through psycopg2 (tests/helpers.py), not cmbagent_db.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

import cmbagent_db
from cmbagent_db import OperationalError, approvals, get_db_session
from cmbagent_db.models import ApprovalRequest, Session, WorkflowRun

from helpers import fetch_all, pg_dsn, row_count

HEAD = "004_approval_changes"
REVS = ["000_base", "001_session_states", "002_approvals_connections", "003_cmbagent_columns", HEAD]
PG_PASSWORD = "s3cret-pw"  # conftest's role password
TESTS_DIR = str(Path(__file__).resolve().parent)


# --------------------------------------------------------------------------- helpers


def dbname_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def admin_conn(pg_server):
    """An autocommit psycopg2 connection to the server's ``postgres`` database."""
    import psycopg2

    conn = psycopg2.connect(pg_dsn(pg_server.admin_url), connect_timeout=10)
    conn.autocommit = True
    return conn


def other_backends(admin, dbname):
    cur = admin.cursor()
    cur.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    )
    return [r[0] for r in cur.fetchall()]


def terminate_all_backends(admin, dbname, wait=10.0):
    """pg_terminate_backend every backend of ``dbname`` but the admin's; wait until gone.

    Returns the number of backends terminated.
    """
    cur = admin.cursor()
    cur.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    )
    n = sum(1 for (ok,) in cur.fetchall() if ok)
    deadline = time.monotonic() + wait
    while other_backends(admin, dbname):
        assert time.monotonic() < deadline, "terminated backends did not go away"
        time.sleep(0.05)
    return n


def with_scheme(url: str, scheme: str) -> str:
    return scheme + "://" + url.split("://", 1)[1]


def with_query(url: str, query: str) -> str:
    return urlunsplit(urlsplit(url)._replace(query=query))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_texts(exc: BaseException):
    """Every text a user might see for an exception (and its chain)."""
    import traceback

    out = []
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out += [str(e), repr(e), *[str(a) for a in e.args]]
        e = e.__cause__ or e.__context__
    out.append("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return out


# --------------------------------------------------------------------------- lost backend


def test_terminated_backend_gives_operational_error_then_recovers(pg_url, pg_server):
    """The session's own connection is killed while it holds a transaction after flush."""
    cmbagent_db.init_database(pg_url)
    dbname = dbname_of(pg_url)
    cmbagent_db.dispose_engines()  # no idle pooled connections: only the session's own

    db = get_db_session(pg_url)
    doomed = Session(name="uncommitted-when-killed")
    db.add(doomed)
    db.flush()  # the session now holds an open transaction on its own connection

    admin = admin_conn(pg_server)
    try:
        before = other_backends(admin, dbname)
        assert len(before) >= 1, "the session's connection is not visible in pg_stat_activity"
        assert terminate_all_backends(admin, dbname) == len(before)

        # The session's next statement fails with OperationalError, not a hang or a panic.
        with pytest.raises(OperationalError) as info:
            db.query(Session).count()
        assert "terminat" in str(info.value).lower() or "connection" in str(info.value).lower()

        # rollback() on the dead connection works (it must not raise).
        db.rollback()

        # The same session works again, on a fresh connection.
        kept = Session(name="after-rollback-same-session")
        db.add(kept)
        db.commit()
        assert db.query(Session).filter(Session.name == kept.name).one() is kept

        # A new session in this process works (no restart of Python).
        other = get_db_session(pg_url)
        other.add(Session(name="new-session"))
        other.commit()
        assert other.query(Session).count() == 2
        other.close()

        # What the server holds: the killed transaction's row is gone, the others are there.
        names = sorted(r[0] for r in fetch_all(pg_url, "SELECT name FROM sessions"))
        assert names == ["after-rollback-same-session", "new-session"]
    finally:
        admin.close()
        db.close()


def test_pool_does_not_hand_out_dead_connections(pg_url, pg_server):
    """Idle pooled connections whose backends were terminated are never given to a caller."""
    cmbagent_db.init_database(pg_url)
    dbname = dbname_of(pg_url)
    # Fill the pool with idle connections: three sessions each holding a transaction at the
    # same time (so three connections), then given back.
    warm = [get_db_session(pg_url) for _ in range(3)]
    for i, w in enumerate(warm):
        w.add(Session(name=f"warm-{i}"))
        w.flush()
    for w in warm:
        w.rollback()
        w.close()
    assert row_count(pg_url, "sessions") == 0

    admin = admin_conn(pg_server)
    try:
        assert terminate_all_backends(admin, dbname) >= 3
        failures = []
        for i in range(5):
            db = get_db_session(pg_url)
            try:
                db.query(Session).count()
                db.add(Session(name=f"fresh-{i}"))
                db.commit()
            except OperationalError as e:
                failures.append(f"attempt {i}: {e}")
                db.rollback()
            finally:
                db.close()
        assert failures == [], (
            "the pool handed out connections whose server backend was already gone: "
            + "; ".join(failures)
        )
        assert row_count(pg_url, "sessions") == 5
    finally:
        admin.close()


def test_terminated_backend_during_commit_rolls_back_whole_transaction(pg_url, pg_server):
    """The kill between flush and commit: commit raises, nothing of the transaction stays."""
    cmbagent_db.init_database(pg_url)
    db = get_db_session(pg_url)
    s = Session(name="parent")
    db.add(s)
    db.flush()
    db.add_all([WorkflowRun(session_id=s.id) for _ in range(10)])
    db.flush()
    admin = admin_conn(pg_server)
    try:
        terminate_all_backends(admin, dbname_of(pg_url))
    finally:
        admin.close()
    with pytest.raises(OperationalError):
        db.commit()
    db.rollback()
    assert row_count(pg_url, "sessions") == 0
    assert row_count(pg_url, "workflow_runs") == 0
    db.close()


# --------------------------------------------------------------------------- connection errors


def _connect_and_use(url):
    """get_db_session + a query; returns the session if get_db_session itself succeeded."""
    box = {}

    def run():
        box["db"] = get_db_session(url)
        box["db"].query(Session).count()

    with pytest.raises(OperationalError) as info:
        run()
    return info.value, box.get("db")


@pytest.mark.parametrize("auto_migrate", ["true", "false"])
def test_wrong_password_is_operational_error_without_the_password(pg_url, auto_migrate):
    parts = urlsplit(pg_url)
    dbname = dbname_of(pg_url)
    secret = "WrongPassword-" + uuid.uuid4().hex
    url = urlunsplit(
        parts._replace(
            netloc=f"{parts.username}:{secret}@{parts.hostname}:{parts.port}",
            query=f"connect_timeout=5&auto_migrate={auto_migrate}",
        )
    )
    exc, db = _connect_and_use(url)
    msg = str(exc)
    assert parts.hostname in msg, msg
    assert dbname in msg, msg
    for text in error_texts(exc):
        assert secret not in text
    if db is not None:
        assert secret not in repr(db)
        assert parts.hostname in repr(db)
    # The server's real password must not appear either.
    for text in error_texts(exc):
        assert PG_PASSWORD not in text


@pytest.mark.parametrize("auto_migrate", ["true", "false"])
def test_closed_port_is_operational_error_without_the_password(auto_migrate):
    port = free_port()
    secret = "ClosedPortPw-" + uuid.uuid4().hex
    dbname = "db_" + uuid.uuid4().hex[:8]
    url = (
        f"postgresql://someone:{secret}@127.0.0.1:{port}/{dbname}"
        f"?connect_timeout=5&auto_migrate={auto_migrate}"
    )
    t0 = time.monotonic()
    exc, db = _connect_and_use(url)
    assert time.monotonic() - t0 < 30
    msg = str(exc)
    assert "127.0.0.1" in msg and dbname in msg, msg
    # Why it failed, not only that connecting did.
    assert "refused" in msg.lower(), msg
    for text in error_texts(exc):
        assert secret not in text
    if db is not None:
        assert secret not in repr(db)


def test_missing_database_is_operational_error(pg_server):
    """Connecting to a database that does not exist is a connection failure (connection
    failures are OperationalError; psycopg2 and SQLAlchemy say the same)."""
    dbname = "no_such_db_" + uuid.uuid4().hex[:8]
    url = with_query(pg_server.url_for(dbname), "connect_timeout=5")
    with pytest.raises(cmbagent_db.Error) as info:
        get_db_session(url).query(Session).count()
    for text in error_texts(info.value):
        assert PG_PASSWORD not in text
    assert dbname in str(info.value) and "127.0.0.1" in str(info.value)
    assert isinstance(info.value, OperationalError), f"{type(info.value).__name__}: {info.value}"


def test_repr_of_working_session_hides_password(pg_url):
    cmbagent_db.init_database(pg_url)
    db = get_db_session(pg_url)
    assert PG_PASSWORD not in repr(db)
    assert PG_PASSWORD not in str(db)
    assert dbname_of(pg_url) in repr(db)
    db.close()


# --------------------------------------------------------------------------- silent servers


class SilentServer:
    """Accepts TCP connections and never says a word: a hung server or a wrong port."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)

    def close(self):
        self._stop = True
        self._thread.join(5)
        for c in self.accepted:
            c.close()
        self.sock.close()


class StallingProxy:
    """Forwards TCP to the PostgreSQL server until ``stall()``; from then on, until
    ``resume()``, it holds every byte in both directions and leaves new connections
    unanswered: a server that stops answering while the network stays up."""

    def __init__(self, host, port):
        self.upstream = (host, port)
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._closed = False
        self._sockets = []
        # The last bytes each client sent, in connection order.
        self.client_tails = []
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self):
        self.forwarding.clear()

    def resume(self):
        self.forwarding.set()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        self.forwarding.wait()
        server = socket.create_connection(self.upstream)
        self._sockets += [client, server]
        ends = {client: server, server: client}
        slot = len(self.client_tails)
        self.client_tails.append(b"")
        try:
            while not self._closed:
                self.forwarding.wait()
                ready, _, _ = select.select(list(ends), [], [], 0.05)
                for s in ready:
                    if not self.forwarding.is_set():
                        break
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client:
                        self.client_tails[slot] = (self.client_tails[slot] + data)[-64:]
                    ends[s].sendall(data)
        except (OSError, ValueError):  # ValueError: a socket closed by close() meanwhile
            return
        finally:
            client.close()
            server.close()

    def close(self):
        self._closed = True
        self.forwarding.set()
        self.sock.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def silent_server():
    srv = SilentServer()
    yield srv
    srv.close()


@pytest.fixture
def stalling_url(migrated_pg_url):
    """``(url through a StallingProxy, proxy)`` for a migrated database."""
    parts = urlsplit(migrated_pg_url)
    proxy = StallingProxy(parts.hostname, parts.port)
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
    yield parts._replace(netloc=netloc).geturl(), proxy
    proxy.close()


def _fails_within(fn, low, high):
    """Runs ``fn``; it must raise OperationalError after ``low`` to ``high`` seconds."""
    t0 = time.monotonic()
    with pytest.raises(OperationalError) as info:
        fn()
    elapsed = time.monotonic() - t0
    assert low <= elapsed < high, f"failed after {elapsed:.2f}s, expected {low}-{high}s: {info.value}"
    return info.value


@pytest.mark.parametrize("query, low, high", [("connect_timeout=1", 0.9, 4.0), ("", 9.5, 16.0)], ids=["given", "default"])
def test_server_that_never_answers_start_up_costs_connect_timeout(silent_server, query, low, high):
    """The whole attempt (TCP, then start-up and authentication) is bounded: psycopg2 gives
    up after ``connect_timeout`` too. With none given, the bound is 10 s."""
    url = f"postgresql://u:NeverShown-pw@127.0.0.1:{silent_server.port}/db?auto_migrate=false"
    if query:
        url += "&" + query
    err = _fails_within(lambda: get_db_session(url).query(Session).count(), low, high)
    assert "connect_timeout" in str(err) and "127.0.0.1" in str(err), err
    assert "NeverShown-pw" not in str(err)
    assert silent_server.accepted, "the attempt never reached the server"


def test_statement_to_a_server_that_stopped_answering_costs_command_timeout(stalling_url):
    url, proxy = stalling_url
    db = get_db_session(url + "?command_timeout=1&connect_timeout=2")
    before = db.query(Session).count()
    proxy.stall()
    # One second for the statement, up to two more for the cancel request that follows it.
    err = _fails_within(lambda: db.query(Session).count(), 0.9, 5.0)
    assert "command_timeout=1" in str(err), err
    proxy.resume()
    db.rollback()
    # The abandoned connection was not pooled: the session works on a new one.
    assert db.query(Session).count() == before
    db.add(Session(name="after the stall"))
    db.commit()
    assert db.query(Session).count() == before + 1
    db.close()


def test_timeouts_beyond_what_a_clock_counts_mean_no_limit(migrated_pg_url):
    db = get_db_session(migrated_pg_url + "?connect_timeout=1e300&command_timeout=1e300")
    db.add(Session(name="no limit"))
    db.commit()
    assert db.query(Session).filter(Session.name == "no limit").count() == 1
    db.close()


def test_without_command_timeout_a_statement_waits_for_a_slow_answer(stalling_url):
    """No bound by default: a server that answers late is waited for, not given up on."""
    url, proxy = stalling_url
    db = get_db_session(url)
    db.query(Session).count()
    proxy.stall()
    threading.Timer(1.5, proxy.resume).start()
    t0 = time.monotonic()
    assert db.query(Session).count() >= 0
    assert time.monotonic() - t0 >= 1.4
    db.close()


def test_closing_a_connection_says_goodbye_to_the_server(stalling_url):
    """A pooled connection closed by dispose_engines() ends with PostgreSQL's Terminate
    message, so the server (or PgBouncer) sees a client that left, not one that vanished."""
    url, proxy = stalling_url
    db = get_db_session(url)
    db.query(Session).count()
    db.close()
    cmbagent_db.dispose_engines()
    deadline = time.monotonic() + 5
    while not all(t.endswith(b"X\x00\x00\x00\x04") for t in proxy.client_tails):
        assert time.monotonic() < deadline, f"no Terminate message: {proxy.client_tails}"
        time.sleep(0.02)
    assert proxy.client_tails


def _pending_request(url):
    db = get_db_session(url)
    s = Session(name="waits")
    db.add(s)
    db.flush()
    run = WorkflowRun(session_id=s.id, agent="engineer", model="gpt-4o", status="waiting_approval")
    db.add(run)
    db.flush()
    req = ApprovalRequest.create_pending(run_id=run.id, approval_type="plan_approval", context={}, timeout_seconds=300)
    db.add(req)
    db.commit()
    return db, req.id


def test_waiter_on_a_server_that_stopped_answering_fails_after_the_connect_timeout(stalling_url):
    """The watcher runs only one-row statements, bounded by the connect timeout: a server
    that never answered fails the wait after it; one that stops answering for a while is
    waited out; one gone for good ends the wait with an OperationalError after twice the
    connect timeout (at least 10 s) instead of at the caller's timeout."""
    url, proxy = stalling_url
    url += "?connect_timeout=2"
    db, rid = _pending_request(url)
    proxy.stall()
    # The watcher's first connection: bounded by connect_timeout.
    _fails_within(lambda: approvals.wait(rid, timeout=60, url=url), 1.9, 6.0)
    proxy.resume()
    # Mid-wait, the server stops answering for 3 s: the wait goes on, and the resolution
    # made once it answers again reaches the waiter.
    threading.Timer(0.5, proxy.stall).start()
    threading.Timer(3.5, proxy.resume).start()

    def resolve_later() -> None:
        time.sleep(5)
        other = get_db_session(url)
        assert approvals.resolve(other, rid, "approved") is True
        other.close()

    resolver = threading.Thread(target=resolve_later)
    resolver.start()
    assert approvals.wait(rid, timeout=60, url=url).resolution == "approved"
    resolver.join()
    # Gone for good: the wait ends with the reason.
    db.close()
    db, rid = _pending_request(url)
    threading.Timer(0.5, proxy.stall).start()
    err = _fails_within(lambda: approvals.wait(rid, timeout=60, url=url), 10.0, 18.0)
    assert "out of reach" in str(err), err
    proxy.resume()
    db.rollback()
    db.close()


# --------------------------------------------------------------------------- URL spellings


@pytest.mark.parametrize(
    "scheme", ["postgresql", "postgresql+psycopg2", "postgresql+psycopg", "postgres"]
)
def test_url_spellings_with_libpq_parameters(pg_url, scheme):
    url = with_query(with_scheme(pg_url, scheme), "sslmode=disable&connect_timeout=5")
    assert cmbagent_db.init_database(url) == HEAD
    assert cmbagent_db.current(url) == HEAD
    db = get_db_session(url)
    s = Session(name=f"via-{scheme}")
    db.add(s)
    db.commit()
    db.close()
    other = get_db_session(url)
    assert other.get(Session, s.id).name == f"via-{scheme}"
    other.close()
    assert fetch_all(pg_url, "SELECT name FROM sessions") == [(f"via-{scheme}",)]
    assert fetch_all(pg_url, "SELECT version_num FROM alembic_version") == [(HEAD,)]


# --------------------------------------------------------------------------- catalogue


def test_partial_pending_expiry_index_in_pg_indexes(migrated_pg_url):
    rows = fetch_all(
        migrated_pg_url,
        "SELECT indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = current_schema() AND tablename = 'approval_requests'",
    )
    partial = [(n, d) for n, d in rows if " WHERE " in d.upper()]
    assert len(partial) == 1, rows
    name, definition = partial[0]
    assert name.startswith("idx_approval_"), name
    assert "expires_at" in definition
    assert "status" in definition and "'pending'" in definition, definition
    # No column indexed twice (SCHEMA.md): every non-partial index has a distinct column list.
    cols = [d.split("(", 1)[1].split(")", 1)[0] for n, d in rows if " WHERE " not in d.upper()]
    assert len(cols) == len(set(cols)), rows


@pytest.fixture
def migrated_pg_url(pg_url):
    cmbagent_db.init_database(pg_url)
    return pg_url


TS = "timestamp without time zone"
TSTZ = "timestamp with time zone"

EXPECTED_TYPES = {
    ("sessions", "created_at"): TS,
    ("sessions", "last_active_at"): TS,
    ("sessions", "meta"): "json",
    ("sessions", "resource_limits"): "json",
    ("workflow_runs", "started_at"): TS,
    ("workflow_runs", "completed_at"): TS,
    ("workflow_runs", "last_heartbeat_at"): TS,
    ("workflow_runs", "meta"): "json",
    ("workflow_runs", "task_description"): "text",
    ("workflow_runs", "is_branch"): "boolean",
    ("workflow_runs", "branch_depth"): "integer",
    ("session_states", "created_at"): TSTZ,
    ("session_states", "updated_at"): TSTZ,
    ("session_states", "expires_at"): TSTZ,
    ("session_states", "conversation_history"): "json",
    ("session_states", "context_variables"): "json",
    ("session_states", "plan_data"): "json",
    ("approval_requests", "created_at"): TSTZ,
    ("approval_requests", "expires_at"): TSTZ,
    ("approval_requests", "resolved_at"): TSTZ,
    ("approval_requests", "context"): "json",
    ("approval_requests", "result"): "json",
    ("active_connections", "connected_at"): TSTZ,
    ("active_connections", "last_heartbeat"): TSTZ,
    ("sessions", "name"): "character varying",
}


def test_column_types_in_information_schema(migrated_pg_url):
    rows = fetch_all(
        migrated_pg_url,
        "SELECT table_name, column_name, data_type, character_maximum_length "
        "FROM information_schema.columns WHERE table_schema = current_schema()",
    )
    types = {(t, c): d for t, c, d, _ in rows}
    lengths = {(t, c): n for t, c, _, n in rows}
    wrong = {k: (types.get(k), v) for k, v in EXPECTED_TYPES.items() if types.get(k) != v}
    assert not wrong, f"(got, expected): {wrong}"
    assert lengths[("sessions", "name")] == 255
    assert lengths[("active_connections", "task_id")] == 100
    # No jsonb anywhere, no timestamptz where SCHEMA.md says plain TIMESTAMP.
    assert "jsonb" not in set(types.values())


# --------------------------------------------------------------------------- concurrent migrate


MIGRATE_WORKER = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {tests!r})
    import cmbagent_db
    url, start_at = sys.argv[1], float(sys.argv[2])
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.time()
    try:
        rev = cmbagent_db.migrate(url, "head")
        print(json.dumps({{"ok": True, "rev": rev, "t0": t0, "t1": time.time()}}))
    except Exception as e:
        print(json.dumps({{"ok": False, "error": type(e).__name__ + ": " + str(e)}}))
        sys.exit(1)
    """
).format(tests=TESTS_DIR)


def test_six_processes_migrate_at_the_same_moment(pg_url, tmp_path):
    n = 6
    script = tmp_path / "migrate_worker.py"
    script.write_text(MIGRATE_WORKER)
    start_at = time.time() + 2.0  # every process is up and imported by then
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), pg_url, str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"exit {p.returncode}: {out} {err}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["ok"] and r["rev"] == HEAD for r in results), results
    # They really overlapped: every one started before the first one finished.
    first_end = min(r["t1"] for r in results)
    assert sum(1 for r in results if r["t0"] <= first_end) >= 2, results

    assert fetch_all(pg_url, "SELECT version_num FROM alembic_version") == [(HEAD,)]
    applied = cmbagent_db.applied(pg_url)
    assert [a["revision"] for a in applied] == REVS, applied
    assert all(a["matches"] for a in applied)
    assert row_count(pg_url, "cmbagent_db_migrations") == len(REVS)
    assert cmbagent_db.check(pg_url) == []
    assert cmbagent_db.current(pg_url) == HEAD

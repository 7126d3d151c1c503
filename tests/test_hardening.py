"""Hardening: faults, contention, hostile input, secrets, and every exception class.

Real processes and real servers, no mocks:

- Contention: a SQLite writer held by another process longer than the busy timeout; many
  threads and many processes writing and reading at once (both backends).
- Crash safety: SIGKILL in the middle of a large commit and of a migration (SQLite), the
  server backend terminated in the middle of a large commit (PostgreSQL).
- Hostile input (hypothesis): JSON, timestamps, strings round-tripped through both backends
  and read back in a NEW session; what JSON cannot hold is refused; injection attempts through
  filter values, filter_by keys, order_by, update() keys and URLs; a 20 MB context.
- Secrets: no message, repr or log record shows a URL's password.
- Exceptions: one test per class of cmbagent_db.exceptions showing the condition raising it.

The counters of ``STATS`` (faults injected, hostile inputs tried, processes / threads) are
printed at the end of the module (run with ``-s`` to see them).
"""

from __future__ import annotations

import collections
import enum
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cmbagent_db
from cmbagent_db import (
    DatabaseError,
    DataError,
    Error,
    IntegrityError,
    InterfaceError,
    InvalidRequestError,
    MigrationError,
    MultipleResultsFound,
    NoResultFound,
    NotSupportedError,
    OperationalError,
    PendingRollbackError,
    ProgrammingError,
    StaleDataError,
    approvals,
    get_db_session,
)
from cmbagent_db import exceptions as exc_mod
from cmbagent_db.models import ActiveConnection, ApprovalRequest, Session, WorkflowRun

from helpers import connected, fetch_all, is_postgresql, is_sqlite, pg_dsn, raw_connect, row_count, sqlite_path

UTC = timezone.utc
HEAD = "004_approval_changes"
REVS = ["000_base", "001_session_states", "002_approvals_connections", "003_cmbagent_columns", HEAD]
TABLES_AT = {
    None: set(),
    "000_base": {"sessions", "workflow_runs"},
    "001_session_states": {"sessions", "workflow_runs", "session_states"},
    "002_approvals_connections": {"sessions", "workflow_runs", "session_states", "approval_requests", "active_connections"},
    "003_cmbagent_columns": {"sessions", "workflow_runs", "session_states", "approval_requests", "active_connections"},
    HEAD: {"sessions", "workflow_runs", "session_states", "approval_requests", "active_connections"},
}
ALL_TABLES = sorted(TABLES_AT[HEAD])
BOOKKEEPING = {"alembic_version", "cmbagent_db_migrations", "cmbagent_db_approval_changes"}
PG_PASSWORD = "s3cret-pw"
TESTS_DIR = str(Path(__file__).resolve().parent)

STATS = collections.Counter()
SEED = int(os.environ.get("CMBAGENT_DB_FAULT_SEED", str(int(time.time()))))
RNG = random.Random(SEED)

HYPO = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@pytest.fixture(scope="module", autouse=True)
def _report_stats():
    yield
    sys.stderr.write(
        f"\n[test_hardening] fault seed {SEED}; counts: "
        + ", ".join(f"{k}={v}" for k, v in sorted(STATS.items()))
        + "\n"
    )


# ======================================================================================
# helpers
# ======================================================================================


def unique(prefix="x"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def utcnow():
    return datetime.now(UTC)


def dbname_of(url):
    return urlsplit(url).path.lstrip("/")


def admin_conn(pg_server):
    import psycopg2

    conn = psycopg2.connect(pg_dsn(pg_server.admin_url), connect_timeout=10)
    conn.autocommit = True
    return conn


def terminate_backends(admin, dbname):
    cur = admin.cursor()
    cur.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    )
    return sum(1 for (ok,) in cur.fetchall() if ok)


def make_run(url):
    """A committed Session + WorkflowRun; returns (session_id, run_id)."""
    db = get_db_session(url)
    s = Session(name=unique("parent"))
    db.add(s)
    db.commit()
    r = WorkflowRun(session_id=s.id)
    db.add(r)
    db.commit()
    ids = (s.id, r.id)
    db.close()
    return ids


def write_script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


SQLITE_INSPECT = textwrap.dedent(
    """
    import json, sqlite3, sys
    c = sqlite3.connect(sys.argv[1], timeout=10)
    out = {"integrity": [r[0] for r in c.execute("PRAGMA integrity_check")]}
    out["tables"] = sorted(r[0] for r in c.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"))
    if "alembic_version" in out["tables"]:
        out["version"] = [r[0] for r in c.execute("SELECT version_num FROM alembic_version")]
    if "approval_requests" in out["tables"]:
        out["approvals"] = c.execute("SELECT COUNT(*) FROM approval_requests").fetchone()[0]
    c.close()
    print(json.dumps(out))
    """
)


def sqlite_inspect(path):
    """integrity_check, tables, alembic_version and approval count, from another process."""
    proc = subprocess.run(
        [sys.executable, "-c", SQLITE_INSPECT, path], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def strict_equal(a, b):
    """Equality that also tells bool / int / float, list / tuple apart (JSON types)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strict_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


def texts_of(exc):
    out = []
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out += [str(e), repr(e)] + [repr(a) for a in e.args]
        e = e.__cause__ or e.__context__
    out.append("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return out


@pytest.fixture
def url_and_run(migrated_url):
    sid, rid = make_run(migrated_url)
    return migrated_url, sid, rid


# ======================================================================================
# Contention
# ======================================================================================

HOLDER = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)
c.execute("BEGIN IMMEDIATE")
c.execute("INSERT INTO sessions (id, name, created_at, last_active_at, status) "
          "VALUES ('holder', 'holder', '2024-01-01 00:00:00.000000', "
          "'2024-01-01 00:00:00.000000', 'active')")
print("LOCKED", flush=True)
sys.stdin.readline()
c.execute("COMMIT")
print("RELEASED", flush=True)
"""


def _in_thread(fn, timeout):
    """Runs fn in a thread; returns ('ok', value) / ('raised', exc) / ('hung', None)."""
    box = {}

    def run():
        try:
            box["ok"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["raised"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return "hung", None
    if "raised" in box:
        return "raised", box["raised"]
    return "ok", box.get("ok")


def test_sqlite_writer_held_longer_than_busy_timeout(sqlite_url, tmp_path):
    cmbagent_db.init_database(sqlite_url)
    url = sqlite_url + "?timeout=0.2"
    db = get_db_session(url)
    path = sqlite_path(sqlite_url)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    STATS["processes (contention)"] += 1
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        # WAL: reading works while another process holds the write lock.
        assert db.query(Session).count() == 0
        blocked = Session(name="blocked-by-holder")
        db.add(blocked)
        t0 = time.monotonic()
        outcome, value = _in_thread(db.commit, timeout=15)
        elapsed = time.monotonic() - t0
        assert outcome != "hung", "commit hung while another process held the write lock"
        assert outcome == "raised" and isinstance(value, OperationalError), (outcome, value)
        # The URL's 0.2 s applies, not the 5 s default (generous bound, no precision).
        assert elapsed < 4.5, elapsed
        assert "locked" in str(value).lower() or "busy" in str(value).lower(), str(value)
        STATS["faults injected"] += 1

        db.rollback()
        # Still locked: a second write fails the same way, fast, and does not hang.
        db.add(Session(name="blocked-again"))
        outcome, value = _in_thread(db.commit, timeout=15)
        assert outcome == "raised" and isinstance(value, OperationalError), (outcome, value)
        db.rollback()

        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "RELEASED"
        assert holder.wait(timeout=10) == 0

        after = Session(name="after-release")
        db.add(after)
        db.commit()
        STATS["faults survived"] += 1
        names = sorted(r[0] for r in fetch_all(sqlite_url, "SELECT name FROM sessions"))
        assert names == ["after-release", "holder"]
        assert db.query(Session).filter(Session.name == "after-release").one() is after
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        db.close()


def test_commit_waiting_for_a_lock_releases_the_gil(sqlite_url):
    """While one thread's commit waits for another process's write lock, other Python
    threads keep running (the wait happens with the GIL released)."""
    cmbagent_db.init_database(sqlite_url)
    db = get_db_session(sqlite_url + "?timeout=1.5")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, sqlite_path(sqlite_url)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        db.add(Session(name="waits"))
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("r", _in_thread(db.commit, 15)))
        ticks, last, max_gap = 0, time.monotonic(), 0.0
        end = last + 1.0  # the commit waits 1.5 s for the lock, all through this loop
        t.start()
        while time.monotonic() < end:
            now = time.monotonic()
            max_gap = max(max_gap, now - last)
            last = now
            ticks += 1
        t.join(20)
        outcome, value = box["r"]
        assert outcome == "raised" and isinstance(value, OperationalError), (outcome, value)
        assert max_gap < 0.5, f"main thread stalled {max_gap:.2f}s while the commit waited"
        assert ticks > 1000
        db.rollback()
    finally:
        holder.kill()
        holder.wait()
        db.close()


N_THREADS = 8
N_WRITES = 25


def test_threads_write_and_read_at_once(migrated_url):
    barrier = threading.Barrier(N_THREADS)
    committed = [[] for _ in range(N_THREADS)]
    lock_errors = []
    other_errors = []
    monotonic_violations = []

    def worker(k):
        db = get_db_session(migrated_url)
        try:
            barrier.wait(30)
            last_seen = 0
            for i in range(N_WRITES):
                name = f"thread{k}-row{i}"
                for _attempt in range(20):
                    obj = Session(name=name, user_id=f"thread{k}")
                    db.add(obj)
                    try:
                        db.commit()
                        committed[k].append(name)
                        break
                    except OperationalError as e:
                        lock_errors.append(str(e))
                        db.rollback()
                else:
                    other_errors.append(f"thread {k}: row {i} never committed")
                seen = db.query(Session).count()
                if seen < last_seen:
                    monotonic_violations.append((k, last_seen, seen))
                last_seen = seen
                mine = db.query(Session).filter(Session.user_id == f"thread{k}").count()
                if mine != len(committed[k]):
                    other_errors.append(f"thread {k}: sees {mine} own rows, committed {len(committed[k])}")
        except Exception as e:  # noqa: BLE001
            other_errors.append(f"thread {k}: {type(e).__name__}: {e}")
        finally:
            db.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    STATS["threads (contention)"] += N_THREADS
    STATS["lock errors seen (threads)"] += len(lock_errors)
    assert other_errors == []
    assert monotonic_violations == []
    expected = sorted(n for names in committed for n in names)
    assert len(expected) == N_THREADS * N_WRITES
    got = sorted(r[0] for r in fetch_all(migrated_url, "SELECT name FROM sessions"))
    assert got == expected
    for e in lock_errors:
        assert "locked" in e.lower() or "busy" in e.lower(), e


PROC_WORKER = """
import json, sys, time
import cmbagent_db
from cmbagent_db import OperationalError, get_db_session
from cmbagent_db.models import Session
url, k, n, start_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
db = get_db_session(url)
while time.time() < start_at:
    time.sleep(0.001)
committed, lock_errors, other = [], [], []
last = 0
for i in range(n):
    name = "proc%d-row%d" % (k, i)
    for attempt in range(20):
        db.add(Session(name=name, user_id="proc%d" % k))
        try:
            db.commit()
            committed.append(name)
            break
        except OperationalError as e:
            lock_errors.append(str(e))
            db.rollback()
    try:
        seen = db.query(Session).count()
        if seen < last:
            other.append("count went down %d -> %d" % (last, seen))
        last = seen
        mine = db.query(Session).filter(Session.user_id == "proc%d" % k).count()
        if mine != len(committed):
            other.append("sees %d own rows, committed %d" % (mine, len(committed)))
    except Exception as e:
        other.append("%s: %s" % (type(e).__name__, e))
print(json.dumps({"committed": committed, "lock_errors": lock_errors, "other": other}))
"""

N_PROCS = 4


def test_processes_write_and_read_at_once(migrated_url, tmp_path):
    script = write_script(tmp_path, "proc_worker.py", PROC_WORKER)
    start_at = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, script, migrated_url, str(k), str(N_WRITES), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(N_PROCS)
    ]
    STATS["processes (contention)"] += N_PROCS
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["other"] for r in results] == [[]] * N_PROCS
    lock_errors = [e for r in results for e in r["lock_errors"]]
    STATS["lock errors seen (processes)"] += len(lock_errors)
    for e in lock_errors:
        assert "locked" in e.lower() or "busy" in e.lower(), e
    expected = sorted(n for r in results for n in r["committed"])
    assert len(expected) == N_PROCS * N_WRITES
    got = sorted(r[0] for r in fetch_all(migrated_url, "SELECT name FROM sessions"))
    assert got == expected


# ======================================================================================
# Crash safety
# ======================================================================================

N_BIG = 20_000

BIG_COMMIT = """
import sys, time
from datetime import datetime, timedelta, timezone
import cmbagent_db
from cmbagent_db import get_db_session
from cmbagent_db.models import ApprovalRequest
url, run_id, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = get_db_session(url)
exp = datetime.now(timezone.utc) + timedelta(hours=1)
objs = [ApprovalRequest(run_id=run_id, approval_type="tool_call",
                        context={"i": i, "pad": "p" * 64}, expires_at=exp)
        for i in range(n)]
db.add_all(objs)
print("COMMIT", flush=True)
t0 = time.monotonic()
try:
    db.commit()
except Exception as e:
    print("ERROR %s %s" % (type(e).__name__, e), flush=True)
    sys.exit(3)
print("DONE %.3f" % (time.monotonic() - t0), flush=True)
"""


def _start_big_commit(script, url, run_id):
    p = subprocess.Popen(
        [sys.executable, script, url, run_id, str(N_BIG)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline().strip()
    assert line == "COMMIT", (line, p.stderr.read() if p.poll() is not None else "")
    return p


def test_sqlite_sigkill_during_large_commit(sqlite_url, tmp_path):
    cmbagent_db.init_database(sqlite_url)
    _, run_id = make_run(sqlite_url)
    path = sqlite_path(sqlite_url)
    script = write_script(tmp_path, "big_commit.py", BIG_COMMIT)

    # One undisturbed run to learn how long the commit takes here.
    p = _start_big_commit(script, sqlite_url, run_id)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    duration = float(out.split()[-1])
    expected = N_BIG
    assert sqlite_inspect(path)["approvals"] == expected

    outcomes = collections.Counter()
    for round_ in range(6):
        p = _start_big_commit(script, sqlite_url, run_id)
        time.sleep(RNG.uniform(0, duration * 1.1))
        finished = p.poll() is not None
        if not finished:
            p.send_signal(signal.SIGKILL)
            STATS["faults injected"] += 1
        p.wait(timeout=30)
        state = sqlite_inspect(path)
        assert state["integrity"] == ["ok"], state
        n = state["approvals"]
        assert n in (expected, expected + N_BIG), f"round {round_}: partial commit: {n - expected} rows"
        if not finished:
            STATS["faults survived"] += 1
        outcomes["all" if n == expected + N_BIG else "none"] += 1
        expected = n
    # The database still takes writes through cmbagent_db afterwards.
    db = get_db_session(sqlite_url)
    db.add(ApprovalRequest(run_id=run_id, approval_type="t", context={}, expires_at=utcnow()))
    db.commit()
    db.close()
    assert sqlite_inspect(path)["approvals"] == expected + 1
    STATS["sqlite big-commit kills: none"] += outcomes["none"]
    STATS["sqlite big-commit kills: all"] += outcomes["all"]
    # At least one kill landed before the commit was durable (otherwise nothing was tested).
    assert outcomes["none"] >= 1, outcomes


FORK_AFTER_BIG_COMMITS = """
import os, sys, time, sqlite3
import cmbagent_db
from cmbagent_db.models import ApprovalRequest
url, run_id, child_db, forks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
hung = 0
for _ in range(forks):
    db = cmbagent_db.get_db_session(url)
    db.add_all([ApprovalRequest.create_pending(run_id, "t", {"x": "y" * 500})
                for _ in range(2000)])
    db.commit()  # past 1,000 WAL pages: the checkpoint thread starts now
    db.query(ApprovalRequest).delete()
    db.commit()
    db.close()
    pid = os.fork()
    if pid == 0:
        c = sqlite3.connect(child_db)
        c.execute("SELECT 1")
        c.close()
        os._exit(0)
    deadline = time.monotonic() + 10
    while os.waitpid(pid, os.WNOHANG)[0] == 0:
        if time.monotonic() > deadline:
            hung += 1
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.001)
print("HUNG", hung, flush=True)
"""


def test_sqlite_fork_while_the_checkpoint_thread_works(sqlite_url, tmp_path):
    """A process forked right after a large commit, while the background checkpoint thread
    is inside SQLite, gets a child whose SQLite (Python's sqlite3 included) works: fork
    waits for the thread to leave SQLite. Without that, about a third of these children
    hung on SQLite's allocator mutex."""
    cmbagent_db.init_database(sqlite_url)
    _, run_id = make_run(sqlite_url)
    script = write_script(tmp_path, "fork_after_commits.py", FORK_AFTER_BIG_COMMITS)
    out = subprocess.run(
        [sys.executable, script, sqlite_url, run_id, str(tmp_path / "child.db"), "40"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["HUNG", "0"], out.stdout


MIGRATE_CHILD = """
import sys, time
import cmbagent_db
url = sys.argv[1]
print("READY", flush=True)
t0 = time.monotonic()
cmbagent_db.migrate(url, "head")
print("DONE %.4f" % (time.monotonic() - t0), flush=True)
"""


def test_sqlite_sigkill_during_migrate(tmp_path):
    script = write_script(tmp_path, "migrate_child.py", MIGRATE_CHILD)

    def start(url):
        p = subprocess.Popen(
            [sys.executable, script, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
        return p

    calib = tmp_path / "calib.db"
    p = start(f"sqlite:///{calib}")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    duration = float(out.split()[-1])

    outcomes = collections.Counter()
    for i in range(16):
        path = tmp_path / f"mig{i}.db"
        url = f"sqlite:///{path}"
        p = start(url)
        time.sleep(RNG.uniform(0, duration * 1.5))
        killed = p.poll() is None
        if killed:
            p.send_signal(signal.SIGKILL)
            STATS["faults injected"] += 1
        p.wait(timeout=30)
        if not path.exists():
            outcomes["no file"] += 1
            continue
        state = sqlite_inspect(str(path))
        assert state["integrity"] == ["ok"], state
        cur = cmbagent_db.current(url)
        ours = set(state["tables"]) - BOOKKEEPING
        assert ours == TABLES_AT[cur], f"current() = {cur} but tables are {sorted(ours)}"
        assert state.get("version", []) == ([cur] if cur else []), state
        if cur is not None:
            assert [a["revision"] for a in cmbagent_db.applied(url)] == REVS[: REVS.index(cur) + 1]
        outcomes[cur] += 1
        # And the interrupted database can be finished.
        assert cmbagent_db.migrate(url, "head") == HEAD
        assert set(sqlite_inspect(str(path))["tables"]) - BOOKKEEPING == TABLES_AT[HEAD]
        assert cmbagent_db.check(url) == []
        if killed:
            STATS["faults survived"] += 1
    for k, v in outcomes.items():
        STATS[f"migrate kill left the db at {k}"] += v
    # The kills did not all land after the end (or all before the start).
    assert len(outcomes) >= 2, outcomes


def test_pg_backend_terminated_during_large_commit(pg_url, pg_server, tmp_path):
    cmbagent_db.init_database(pg_url)
    _, run_id = make_run(pg_url)
    script = write_script(tmp_path, "big_commit.py", BIG_COMMIT)
    dbname = dbname_of(pg_url)
    admin = admin_conn(pg_server)
    # One undisturbed run to learn how long the commit takes here; the terminations land
    # at fractions of it (the first one early, so that at least one comes before the end).
    p = _start_big_commit(script, pg_url, run_id)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    duration = float(out.split()[-1])
    outcomes = collections.Counter()
    expected = row_count(pg_url, "approval_requests")
    assert expected == N_BIG
    try:
        for delay in (duration * 0.1, duration * RNG.uniform(0.2, 0.6),
                      duration * RNG.uniform(0.5, 1.2)):
            p = _start_big_commit(script, pg_url, run_id)
            time.sleep(delay)
            finished = p.poll() is not None
            if not finished:
                terminate_backends(admin, dbname)
                STATS["faults injected"] += 1
            out, err = p.communicate(timeout=60)
            if "ERROR" in out:
                assert "ERROR OperationalError" in out, out
            n = row_count(pg_url, "approval_requests")
            assert n in (expected, expected + N_BIG), f"partial commit: {n - expected} rows"
            outcome = "all" if n == expected + N_BIG else "none"
            outcomes[outcome] += 1
            STATS[f"pg big-commit terminations: {outcome}"] += 1
            expected = n
            if not finished:
                STATS["faults survived"] += 1
        assert outcomes["none"] >= 1, outcomes
    finally:
        admin.close()
    # The test process's own pooled connections were terminated too; the pool handing them
    # out again is test_postgresql.py::test_pool_does_not_hand_out_dead_connections.
    cmbagent_db.dispose_engines()
    db = get_db_session(pg_url)
    assert db.query(ApprovalRequest).count() == expected
    db.close()


# ======================================================================================
# Hostile input: JSON
# ======================================================================================

FLOATS = st.floats(allow_nan=False, allow_infinity=False)
BIG_INTS = st.integers(min_value=-(2**256), max_value=2**256)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20) | st.sampled_from(
    ["", "\x00", "\U0001F600\U00010348", "'\"\\", "\\u0000", "\ud7ff\ue000\U0010FFFF", "null"]
)
SCALARS = st.none() | st.booleans() | st.integers() | BIG_INTS | FLOATS | TEXT
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=30,
)


@st.composite
def deep_json(draw):
    value = draw(JSON)
    for _ in range(draw(st.integers(min_value=0, max_value=50))):
        if draw(st.booleans()):
            value = [value]
        else:
            value = {draw(TEXT): value}
    return value


ANY_JSON = JSON | deep_json()
CONTEXT_JSON = st.dictionaries(TEXT, ANY_JSON, max_size=5) | st.lists(ANY_JSON, max_size=5) | deep_json().filter(
    lambda v: isinstance(v, (dict, list))
)


def raw_json(url, table, column, id_):
    """The stored JSON text, parsed here with Python's json (not cmbagent_db's reader)."""
    col = f"{column}::text" if is_postgresql(url) else column
    (value,) = fetch_all(url, f"SELECT {col} FROM {table} WHERE id = ?", (id_,))[0]
    return json.loads(value)


NOT_A_BARE_NUMBER = ANY_JSON.filter(lambda v: isinstance(v, bool) or not isinstance(v, (int, float)))


@HYPO
@given(context=CONTEXT_JSON, result=NOT_A_BARE_NUMBER)
@example(context={"big": 2**64, "neg": -(2**70), "f": 0.1, "e": [], "d": {}, "u": "\U0001F600"}, result=None)
@example(context=[[[[]]]], result={"": {}})
@example(context={"\x00": "\x00"}, result=[-0.0, 5e-324, 1.7976931348623157e308])
def test_json_round_trip(url_and_run, context, result):
    url, _sid, run_id = url_and_run
    STATS["hostile inputs: json"] += 1
    db = get_db_session(url)
    a = ApprovalRequest(
        run_id=run_id, approval_type="tool_call", context=context, result=result,
        expires_at=utcnow() + timedelta(hours=1),
    )
    db.add(a)
    db.commit()
    db.close()
    other = get_db_session(url)
    got = other.get(ApprovalRequest, a.id)
    assert strict_equal(got.context, context), (got.context, context)
    assert strict_equal(got.result, result), (got.result, result)
    other.close()
    assert strict_equal(raw_json(url, "approval_requests", "context", a.id), context)
    if result is not None:
        assert strict_equal(raw_json(url, "approval_requests", "result", a.id), result)


class Level(enum.IntEnum):
    HIGH = 3


class Name(str):
    pass


class Mapping(dict):
    pass


# Keys json.dumps turns into strings, and values of builtin subclasses (written by
# Python's own encoder rather than cmbagent_db's).
KEYS = (TEXT | st.integers() | BIG_INTS | FLOATS | st.booleans() | st.none()
        | st.sampled_from([Name("subclassed key"), Level.HIGH]))
SUBCLASSED = st.sampled_from([Level.HIGH, Name("named"), collections.OrderedDict(a=1),
                              Mapping(b=[2])])
DUMPS_JSON = st.recursive(
    SCALARS | SUBCLASSED,
    lambda inner: st.lists(inner, max_size=5) | st.lists(inner, max_size=5).map(tuple)
    | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=30,
)


@HYPO
@given(context=st.dictionaries(KEYS, DUMPS_JSON, max_size=5)
       | DUMPS_JSON.filter(lambda v: v is not None))
@example(context={"controls": "\x00\x08\x0c\x1f\x7f\x80\u2028", "astral": "\U0001F600\U0010FFFF",
                  True: 1, False: 0, None: [], 1.5: {}, -(2**70): [(), (1,)], 10**30: 0.1,
                  "quotes": "'\"\\/", "tiny": 5e-324, "big": 1e16, "neg": -0.0})
@example(context={"lone surrogate": "\ud800 \udfff"})
def test_json_text_is_what_json_dumps_writes(url_and_run, context):
    """The stored text is byte for byte SQLAlchemy's (json.dumps with its defaults)."""
    url, _sid, run_id = url_and_run
    STATS["hostile inputs: json"] += 1
    db = get_db_session(url)
    a = ApprovalRequest(run_id=run_id, approval_type="t", context=context,
                        expires_at=utcnow())
    db.add(a)
    db.commit()
    db.close()
    col = "context::text" if is_postgresql(url) else "context"
    (text,) = fetch_all(url, f"SELECT {col} FROM approval_requests WHERE id = ?", (a.id,))[0]
    if isinstance(text, bytes):  # a bare number, kept as a BLOB of its text on SQLite
        text = text.decode()
    assert text == json.dumps(context)


def test_json_check_survives_a_value_that_changes_its_container(url_and_run):
    """Checking a JSON value may run Python code (a list subclass's __iter__) that changes
    the dict being checked: a clean result, never a Rust panic."""
    url, _sid, run_id = url_and_run
    context = {}

    class Growing(list):
        def __iter__(self):
            context[f"k{len(context)}"] = 1
            return iter([])

    context["a"] = Growing()
    context["b"] = "after"
    a = ApprovalRequest(run_id=run_id, approval_type="t", context=context, expires_at=utcnow())
    db = get_db_session(url)
    db.add(a)
    db.commit()
    db.close()
    stored = raw_json(url, "approval_requests", "context", a.id)
    # Each walk of the value (the check, the encoder) adds a key; what was there stays.
    assert stored["a"] == [] and stored["b"] == "after"
    assert set(stored) <= set(context)


TOP_LEVEL_NUMBERS = [0, -7, 1.0, -0.0, 0.1, 1e16, 1.5e308, 5e-324, 2**63 - 1, 2**63,
                     -(2**63) - 1, 10**30 + 1]


@pytest.mark.parametrize("value", TOP_LEVEL_NUMBERS, ids=repr)
def test_top_level_json_number_round_trip(url_and_run, value):
    """A JSON column holding a bare number (not inside a list or object) comes back as it
    went in: same type (int / float), same value, no precision lost."""
    url, _sid, run_id = url_and_run
    STATS["hostile inputs: json"] += 1
    db = get_db_session(url)
    a = ApprovalRequest(run_id=run_id, approval_type="t", context=[value], result=value,
                        expires_at=utcnow())
    db.add(a)
    db.commit()
    db.close()
    got = get_db_session(url).get(ApprovalRequest, a.id)
    assert strict_equal(got.context, [value]), got.context
    assert strict_equal(got.result, value), f"stored {value!r}, read back {got.result!r}"


class Opaque:
    pass


BAD_JSON = [
    ({1, 2}, TypeError),
    (frozenset(), TypeError),
    (b"bytes", TypeError),
    (bytearray(b"x"), TypeError),
    (Opaque(), TypeError),
    (Decimal("1.5"), TypeError),
    (datetime(2024, 1, 1), TypeError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (float("-inf"), ValueError),
]


@HYPO
@given(good=ANY_JSON, bad=st.sampled_from(BAD_JSON), where=st.integers(0, 2))
def test_what_json_cannot_hold_is_refused(good, bad, where):
    bad_value, exc_class = bad
    STATS["hostile inputs: refused json"] += 1
    value = [good, bad_value] if where == 0 else {"k": {"deeper": [bad_value]}, "g": good} if where == 1 else bad_value
    with pytest.raises(exc_class, match=r"approval_requests\.context"):
        ApprovalRequest(run_id="r", approval_type="t", context=value, expires_at=utcnow())
    a = ApprovalRequest(run_id="r", approval_type="t", context={"ok": 1}, expires_at=utcnow())
    with pytest.raises(exc_class, match=r"approval_requests\.result"):
        a.result = value
    with pytest.raises(exc_class, match=r"approval_requests\.context"):
        a.context = value
    assert a.context == {"ok": 1} and a.result is None
    with pytest.raises(exc_class, match=r"sessions\.meta"):
        Session(name="n", meta=value)


def test_refused_json_never_reaches_the_database(url_and_run):
    url, _sid, run_id = url_and_run
    db = get_db_session(url)
    a = ApprovalRequest(run_id=run_id, approval_type="t", context={"ok": True}, expires_at=utcnow())
    db.add(a)
    db.commit()
    for bad, cls in BAD_JSON:
        with pytest.raises(cls):
            a.context = {"x": bad}
    db.commit()
    assert raw_json(url, "approval_requests", "context", a.id) == {"ok": True}
    assert get_db_session(url).get(ApprovalRequest, a.id).context == {"ok": True}


# ======================================================================================
# Hostile input: timestamps
# ======================================================================================

OFFSETS = st.integers(min_value=-1439, max_value=1439).map(lambda m: timezone(timedelta(minutes=m)))
DATETIMES = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999),
    timezones=OFFSETS | st.none(),
)


def utc_or_none(dt):
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


@HYPO
@given(dt=DATETIMES)
@example(dt=datetime(1, 1, 1, tzinfo=UTC))
@example(dt=datetime(1, 1, 1, 0, 0, tzinfo=timezone(timedelta(minutes=-1439))))
@example(dt=datetime(1, 1, 1, 0, 0, tzinfo=timezone(timedelta(minutes=1))))
@example(dt=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
@example(dt=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(minutes=-1))))
@example(dt=datetime(9999, 12, 31, 0, 0, 0, 1, tzinfo=timezone(timedelta(minutes=1439))))
@example(dt=datetime(2024, 2, 29, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=-12, minutes=-59))))
def test_timestamp_round_trip(url_and_run, dt):
    url, sid, run_id = url_and_run
    STATS["hostile inputs: timestamps"] += 1
    want = utc_or_none(dt)
    if want is None:
        # Not expressible in UTC (year 0 / year 10000): refused with ValueError.
        with pytest.raises(ValueError):
            ApprovalRequest(run_id=run_id, approval_type="t", context={}, expires_at=dt)
        a = ApprovalRequest(run_id=run_id, approval_type="t", context={}, expires_at=utcnow())
        with pytest.raises(ValueError):
            a.expires_at = dt
        with pytest.raises(ValueError):
            WorkflowRun(session_id=sid, started_at=dt)
        return
    db = get_db_session(url)
    a = ApprovalRequest(
        run_id=run_id, approval_type="t", context={}, expires_at=dt, resolved_at=dt
    )
    r = WorkflowRun(session_id=sid, started_at=dt, completed_at=dt)
    db.add_all([a, r])
    db.commit()
    db.close()
    other = get_db_session(url)
    ga = other.get(ApprovalRequest, a.id)
    gr = other.get(WorkflowRun, r.id)
    for got in (ga.expires_at, ga.resolved_at, gr.started_at, gr.completed_at):
        assert isinstance(got, datetime)
        assert got.utcoffset() == timedelta(0), got
        assert got == want, (got, want, dt)
        assert got.microsecond == want.microsecond
    # The filter side agrees: the stored instant is found by an equality filter.
    assert other.query(WorkflowRun).filter(WorkflowRun.id == r.id, WorkflowRun.started_at == dt).count() == 1
    other.close()


# ======================================================================================
# Hostile input: strings
# ======================================================================================

NASTY = st.sampled_from(
    ["'", '"', "\\", "\x00", "%", "_", "?", "$1", ";", "--", "/*", "*/", "\n", "\r", "\t",
     "\U0001F600", "\u202e", "\ufeff", "ß", "İ", "\x7f", "\x1b", "%s", ":1", "`"]
)
_FRAGMENT = st.characters(blacklist_categories=("Cs",)) | NASTY
STRINGS = st.lists(_FRAGMENT, max_size=120).map("".join).map(lambda s: s[:255])
LONG_TEXT = st.lists(_FRAGMENT | st.text(max_size=200), max_size=60).map("".join)


@HYPO
@given(name=STRINGS, desc=LONG_TEXT)
@example(name="'; DROP TABLE sessions; --", desc="\\'; DROP TABLE workflow_runs; --")
@example(name="\U0001F600" * 255, desc="\x00")
@example(name="a\x00b", desc="ok")
@example(name="", desc="")
def test_string_round_trip(url_and_run, backend, name, desc):
    url, sid, _run_id = url_and_run
    STATS["hostile inputs: strings"] += 1
    marker = str(uuid.uuid4())
    db = get_db_session(url)
    s = Session(name=name, user_id=marker)
    db.add(s)
    has_nul = "\x00" in name or "\x00" in desc
    if backend == "postgresql" and has_nul:
        # PostgreSQL text cannot hold NUL: a clear DataError, and nothing written.
        r = WorkflowRun(session_id=sid, task_description=desc, project_id=marker)
        db.add(r)
        with pytest.raises(DatabaseError) as info:
            db.commit()
        assert isinstance(info.value, DataError), f"{type(info.value).__name__}: {info.value}"
        assert "0x00" in str(info.value) or "nul" in str(info.value).lower(), str(info.value)
        db.rollback()
        assert fetch_all(url, "SELECT COUNT(*) FROM sessions WHERE user_id = ?", (marker,)) == [(0,)]
        assert fetch_all(url, "SELECT COUNT(*) FROM workflow_runs WHERE project_id = ?", (marker,)) == [(0,)]
        db.close()
        return
    r = WorkflowRun(session_id=sid, task_description=desc, project_id=marker)
    db.add(r)
    db.commit()
    db.close()
    other = get_db_session(url)
    assert other.get(Session, s.id).name == name
    assert other.get(WorkflowRun, r.id).task_description == desc
    # As filter values: found exactly, nothing else matched.
    found = other.query(Session).filter(Session.name == name, Session.user_id == marker).all()
    assert [x.id for x in found] == [s.id]
    assert [x.id for x in other.query(Session).filter_by(name=name).all() if x.user_id == marker] == [s.id]
    assert [x.id for x in other.query(WorkflowRun).filter(WorkflowRun.task_description == desc,
                                                          WorkflowRun.project_id == marker).all()] == [r.id]
    other.close()
    assert fetch_all(url, "SELECT name FROM sessions WHERE id = ?", (s.id,)) == [(name,)]
    assert fetch_all(url, "SELECT task_description FROM workflow_runs WHERE id = ?", (r.id,)) == [(desc,)]


@pytest.mark.parametrize("value", ["x" * 256, "\U0001F600" * 256, "'" * 300])
def test_over_long_strings_refused_on_every_backend(value):
    with pytest.raises(DataError, match=r"sessions\.name"):
        Session(name=value)
    s = Session(name="ok")
    with pytest.raises(DataError, match=r"sessions\.name"):
        s.name = value
    assert s.name == "ok"


# ======================================================================================
# Hostile stored rows: values another client wrote behind our back
# ======================================================================================

# What another client can leave in a row. SQLite stores any value in any column; PostgreSQL
# keeps its column types but accepts timestamps far outside Python's range, ``infinity``,
# JSON that is not an object, and any status text.
SQLITE_ANYTHING = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.sampled_from(["2026-13-45 99:99:99", "2026-01-01T00:00:00+99:99", "0000-00-00", "9999-12-31 23:59:59.999999+00:00",
                     "2026-01-01 00:00:07+1\u00e91", "+9999999999999:00", "{", "[1, 2", "null", "pending", "approved"]),
)
PG_TIMESTAMPS = st.sampled_from(["infinity", "-infinity", "294276-12-31 23:59:59+00", "4713-01-01 00:00:00+00 BC",
                                 "0001-01-01 00:00:00+00", "9999-12-31 23:59:59.999999+00", "2026-06-01 12:00:00+05:30"])
PG_JSON = st.one_of(st.sampled_from(["null", "1e308", "-0", '"text"', "[]", "[[[[[[[[[[1]]]]]]]]]]", '{"a": {"b": null}}',
                                     '{"\\u0000": 1}', '"\\ud800"']),
                    ANY_JSON.map(json.dumps))
PG_TEXT = st.one_of(st.none(), st.sampled_from(["pending", "approved", "resolved", "expired", "cancelled", "", " pending", "PENDING"]),
                    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20))


def _hostile_row(draw, backend):
    if backend == "sqlite":
        row = {c: draw(SQLITE_ANYTHING) for c in ("status", "result", "created_at", "resolved_at", "resolution", "context_snapshot")}
        # NOT NULL columns: anything but NULL (sqlite3 stores a NaN as NULL).
        not_null = SQLITE_ANYTHING.filter(lambda v: v is not None and not (isinstance(v, float) and math.isnan(v)))
        row.update({c: draw(not_null) for c in ("context", "expires_at")})
        return row
    return {
        "status": draw(PG_TEXT),
        "resolution": draw(PG_TEXT),
        "context": draw(PG_JSON),
        "result": draw(st.one_of(st.none(), PG_JSON)),
        "context_snapshot": draw(st.one_of(st.none(), PG_JSON)),
        "expires_at": draw(PG_TIMESTAMPS),
        "created_at": draw(st.one_of(st.none(), PG_TIMESTAMPS)),
        "resolved_at": draw(st.one_of(st.none(), PG_TIMESTAMPS)),
    }


def _public_calls(db, url, rid, run_id):
    """Every public way of reading, waiting on and changing a request."""
    return [
        lambda: db.get(ApprovalRequest, rid),
        lambda: db.get(ApprovalRequest, rid).to_dict(),
        lambda: db.query(ApprovalRequest).filter(ApprovalRequest.run_id == run_id).all(),
        lambda: db.query(ApprovalRequest).filter(ApprovalRequest.expires_at < utcnow()).count(),
        lambda: db.query(ApprovalRequest, WorkflowRun).join(WorkflowRun).all(),
        lambda: approvals.pending(db, run_id=run_id),
        lambda: approvals.expire_overdue(db),
        lambda: approvals.resolve(db, rid, "approved", {"ok": True}),
        lambda: approvals.cancel(db, rid),
        lambda: approvals.wait(rid, timeout=0, url=url),
    ]


@HYPO
@given(data=st.data())
def test_hostile_stored_rows_never_panic(url_and_run, data):
    """Rows written with sqlite3 / psycopg2 that our models would never write: every public
    call either works or raises an Exception (cmbagent_db.Error for what the database
    holds), never a PanicException, and the session works after rollback()."""
    url, _, run_id = url_and_run
    backend = "sqlite" if is_sqlite(url) else "postgresql"
    row = _hostile_row(data.draw, backend)
    rid = str(uuid.uuid4())
    cols = ["id", "run_id", "approval_type"] + list(row)
    mark = "?" if backend == "sqlite" else "%s"
    marks = ", ".join(mark for _ in cols)
    with connected(url) as conn:
        conn.cursor().execute(
            f"INSERT INTO approval_requests ({', '.join(cols)}) VALUES ({marks})",
            [rid, run_id, "plan_approval", *row.values()],
        )
    db = get_db_session(url)
    try:
        for call in _public_calls(db, url, rid, run_id):
            try:
                call()
            except Exception:
                STATS["hostile stored row refused"] += 1
                db.rollback()
            except BaseException as e:  # PanicException derives from BaseException
                pytest.fail(f"{type(e).__name__} from {row!r}: {e}")
            else:
                STATS["hostile stored row read"] += 1
        # The session is usable: a fresh read of something well-formed works.
        db.rollback()
        assert db.get(WorkflowRun, run_id) is not None
    finally:
        db.close()
        with connected(url) as conn:
            conn.cursor().execute(f"DELETE FROM approval_requests WHERE id = {mark}", [rid])


# ======================================================================================
# Injection attempts
# ======================================================================================

INJECTIONS = [
    "' OR '1'='1",
    "'; DROP TABLE sessions; --",
    '" OR ""="',
    "\\'; DROP TABLE sessions; --",
    "1; DELETE FROM sessions",
    "%",
    "_",
    "*",
    "$1",
    "?",
    ":name",
    "%(name)s",
    "') OR 1=1 --",
    "x\x00'; DROP TABLE sessions; --",
]


def _table_state(url):
    return {t: row_count(url, t) for t in ALL_TABLES}


def test_injection_through_values_keys_and_order_by(migrated_url, backend):
    url = migrated_url
    db = get_db_session(url)
    victims = [Session(name=f"victim-{i}") for i in range(3)]
    db.add_all(victims)
    db.commit()
    before = _table_state(url)
    for payload in INJECTIONS:
        STATS["hostile inputs: injection"] += 1
        if backend == "postgresql" and "\x00" in payload:
            # The value cannot be sent to PostgreSQL at all: a DataError, nothing matched.
            with pytest.raises(DataError):
                db.query(Session).filter(Session.name == payload).all()
            db.rollback()
            continue
        assert db.query(Session).filter(Session.name == payload).all() == []
        assert db.query(Session).filter_by(name=payload).all() == []
        assert db.query(Session).filter(Session.name.in_([payload, payload + "x"])).count() == 0
        assert db.query(Session).filter(Session.id == payload).update({"status": payload}) == 0
        assert db.query(Session).filter(Session.id == payload).delete() == 0
        assert db.get(Session, payload) is None
        db.commit()
    for key in ["name; DROP TABLE sessions", "name = name OR 1=1 --", "1=1", "", "__class__",
                "_sa_instance_state", "name' OR '1'='1"]:
        STATS["hostile inputs: injection"] += 1
        with pytest.raises(InvalidRequestError):
            db.query(Session).filter_by(**{key: "x"}).all()
        with pytest.raises(InvalidRequestError):
            db.query(Session).update({key: "x"})
        db.rollback()
    for spec in ["id; DROP TABLE sessions", "name DESC; DROP TABLE sessions", "(SELECT 1)",
                 "name, (SELECT password)", "1", "name -- comment"]:
        STATS["hostile inputs: injection"] += 1
        with pytest.raises(InvalidRequestError):
            db.query(Session).order_by(spec).all()
    db.rollback()
    assert _table_state(url) == before
    assert sorted(x.name for x in db.query(Session).all()) == [f"victim-{i}" for i in range(3)]
    db.close()


def test_injection_through_urls(migrated_url, backend, tmp_path):
    url = migrated_url
    db = get_db_session(url)
    db.add(Session(name="keep-me"))
    db.commit()
    db.close()
    before = _table_state(url)
    if backend == "sqlite":
        base = url
        bad = [
            (base + "?timeout=1;DROP TABLE sessions", InterfaceError),
            (base + "?synchronous=OFF;DROP TABLE sessions", InterfaceError),
            (base + "?journal_mode=DELETE", InterfaceError),
            (base + "?auto_migrate=1 OR 1", InterfaceError),
            ("sqlite:/" + sqlite_path(url), InterfaceError),
        ]
    else:
        parts = urlsplit(url)
        bad = [
            (url + "?sslmode=disable'; DROP TABLE sessions; --", Error),
            (url + "?options=-c%20default_transaction_read_only%3Don';DROP TABLE sessions", Error),
            (url + "?connect_timeout=5;DROP TABLE sessions", Error),
            (url + "?statement=DROP TABLE sessions", InterfaceError),
            (urlunsplit(parts._replace(path="/" + quote("x'; DROP TABLE sessions; --"))), Error),
        ]
    for bad_url, cls in bad:
        STATS["hostile inputs: injection"] += 1
        try:
            d = get_db_session(bad_url)
            d.query(Session).count()
            d.close()
        except cls:
            pass
    if backend == "sqlite":
        # A hostile *file name* is just a file name: it creates another database beside it.
        odd = f"sqlite:///{tmp_path}/x'; DROP TABLE sessions; --.db"
        d = get_db_session(odd)
        assert d.query(Session).count() == 0
        d.close()
    assert _table_state(url) == before
    assert [r[0] for r in fetch_all(url, "SELECT name FROM sessions")] == ["keep-me"]


# ======================================================================================
# Very large context
# ======================================================================================


def test_twenty_megabyte_context(url_and_run):
    url, _sid, run_id = url_and_run
    STATS["hostile inputs: 20MB context"] += 1
    blob = ("0123456789abcdef" * (20 * 1024 * 1024 // 16)) + "é\U0001F600"
    context = {"blob": blob, "tail": [1, 2, 3]}
    db = get_db_session(url)
    a = ApprovalRequest(run_id=run_id, approval_type="t", context=context, expires_at=utcnow())
    db.add(a)
    try:
        db.commit()
    except Error as e:  # allowed: a clear error, nothing written, session usable
        msg = str(e)
        assert "approval_requests" in msg or "context" in msg or "too big" in msg.lower(), msg
        db.rollback()
        assert row_count(url, "approval_requests") == 0
        db.add(Session(name="still-works"))
        db.commit()
        db.close()
        return
    db.close()
    other = get_db_session(url)
    got = other.get(ApprovalRequest, a.id).context
    assert got["tail"] == [1, 2, 3]
    assert len(got["blob"]) == len(blob) and got["blob"] == blob
    other.close()


# ======================================================================================
# Secrets
# ======================================================================================

SECRET = "Sup3r-S3cret-" + uuid.uuid4().hex[:10]


def _secret_forms(secret):
    return {secret, quote(secret, safe=""), quote(secret)}


def _exercise(url):
    """Every public entry point that takes a URL; returns (exceptions, reprs)."""
    errors, reprs = [], []
    for call in (
        lambda: get_db_session(url).query(Session).count(),
        lambda: cmbagent_db.migrate(url, "head"),
        lambda: cmbagent_db.current(url),
        lambda: cmbagent_db.init_database(url),
        lambda: cmbagent_db.applied(url),
        lambda: cmbagent_db.check(url),
        lambda: cmbagent_db.stamp(url, "base"),
    ):
        try:
            call()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    sep = "&" if "?" in url else "?"
    try:
        d = get_db_session(url + sep + "auto_migrate=false")
        reprs += [repr(d), str(d)]
    except Exception as e:  # noqa: BLE001
        errors.append(e)
    return errors, reprs


def _assert_no_secret(secret, errors, reprs, caplog):
    forms = _secret_forms(secret)
    for e in errors:
        for text in texts_of(e):
            for f in forms:
                assert f not in text, f"{type(e).__name__} shows the password: {text[:300]}"
    for r in reprs:
        for f in forms:
            assert f not in r, r
    for rec in caplog.records:
        for text in (rec.getMessage(), repr(rec.args), rec.exc_text or "", str(rec.msg)):
            for f in forms:
                assert f not in text, f"log record {rec.name}: {text[:300]}"


def _pg_url_with_password(pg_server, password, dbname="postgres", query=""):
    p = urlsplit(pg_server.admin_url)
    return urlunsplit(p._replace(netloc=f"{p.username}:{password}@{p.hostname}:{p.port}",
                                 path="/" + dbname, query=query))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET_CASES = {
    "refused (wrong password)": lambda srv: _pg_url_with_password(srv, SECRET, query="connect_timeout=5"),
    "closed port": lambda srv: f"postgresql://u:{SECRET}@127.0.0.1:{_free_port()}/db?connect_timeout=5",
    "unknown URL parameter": lambda srv: f"postgresql://u:{SECRET}@127.0.0.1:5432/db?bogus=1",
    "bad sslmode value": lambda srv: _pg_url_with_password(srv, SECRET, query="sslmode=bogus"),
    "bad connect_timeout value": lambda srv: _pg_url_with_password(srv, SECRET, query="connect_timeout=abc"),
    "bad port": lambda srv: f"postgresql://u:{SECRET}@127.0.0.1:notaport/db",
    "bad auto_migrate": lambda srv: f"postgresql://u:{SECRET}@127.0.0.1:5432/db?auto_migrate=maybe",
    "psycopg2 spelling, refused": lambda srv: "postgresql+psycopg2" + _pg_url_with_password(srv, SECRET)[len("postgresql"):],
    "percent-encoded special characters": lambda srv: _pg_url_with_password(srv, quote(SECRET + "@:/?#%", safe="")),
    "password as query parameter": lambda srv: _pg_url_with_password(srv, "x", query=f"password={SECRET}").replace("cmbagent:x@", "cmbagent@"),
    "unencoded '/' in password": lambda srv: _pg_url_with_password(srv, SECRET[:6] + "/" + SECRET[6:]),
    "unencoded '?' in password": lambda srv: _pg_url_with_password(srv, SECRET[:6] + "?" + SECRET[6:]),
}


@pytest.mark.parametrize("case", list(SECRET_CASES))
def test_password_never_shown(case, pg_server, caplog):
    caplog.set_level(logging.DEBUG, logger="cmbagent_db")
    caplog.set_level(logging.DEBUG)
    url = SECRET_CASES[case](pg_server)
    STATS["hostile inputs: secret URLs"] += 1
    errors, reprs = _exercise(url)
    assert errors, "these URLs must all fail"
    for e in errors:
        assert isinstance(e, Error), f"{type(e).__name__}: not a cmbagent_db.Error"
    secret = SECRET
    if "unencoded" in case:
        # The password as typed, and both halves of it.
        _assert_no_secret(SECRET[:6] + ("/" if "/" in case else "?") + SECRET[6:], errors, reprs, caplog)
        secret = SECRET[6:]
    _assert_no_secret(secret, errors, reprs, caplog)


def test_password_not_logged_on_success(pg_url, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="cmbagent_db")
    assert cmbagent_db.migrate(pg_url, "head") == HEAD
    db = get_db_session(pg_url)
    db.add(Session(name="logged"))
    db.commit()
    with pytest.raises(IntegrityError) as info:
        db.add(WorkflowRun(session_id="missing-parent"))
        db.commit()
    db.rollback()
    _assert_no_secret(PG_PASSWORD, [info.value], [repr(db), str(db)], caplog)
    assert any(r.name.startswith("cmbagent_db") for r in caplog.records), "no cmbagent_db log record at all"
    db.close()


def _with_query(url, extra):
    return url + ("&" if "?" in url else "?") + extra


def test_bound_values_are_logged_only_with_echo(migrated_url, caplog):
    """A failed statement logs nothing without echo (the exception tells the caller);
    with echo and hide_parameters the statement but no value; with echo, the values."""
    caplog.set_level(logging.DEBUG)
    secret = "tok-" + uuid.uuid4().hex[:24]

    def fail(url):
        db = get_db_session(url)
        db.add(WorkflowRun(session_id="missing-" + secret, meta={"auth_token": secret}))
        with pytest.raises(IntegrityError):
            db.commit()
        db.rollback()
        db.close()

    def sql_lines():
        return [r.getMessage() for r in caplog.records if r.name == "cmbagent_db.sql"]

    fail(migrated_url)
    assert sql_lines() == []
    assert secret not in caplog.text
    caplog.clear()
    fail(_with_query(migrated_url, "echo=true&hide_parameters=true"))
    lines = sql_lines()
    assert any("INSERT INTO workflow_runs" in m and "values hidden" in m for m in lines), lines
    assert any("statement failed (IntegrityError)" in m for m in lines), lines
    assert secret not in caplog.text
    caplog.clear()
    fail(_with_query(migrated_url, "echo=true"))
    assert any(secret in m for m in sql_lines())


# ======================================================================================
# Exceptions: one test per class, with the real condition
# ======================================================================================

HAS_APPROVALS = hasattr(cmbagent_db, "approvals") or os.path.exists(
    os.path.join(os.path.dirname(cmbagent_db.__file__), "approvals.py")
)
needs_approvals = pytest.mark.skipif(not HAS_APPROVALS, reason="cmbagent_db.approvals not there yet")

COVERED = set()


def covers(*names):
    def deco(fn):
        COVERED.update(names)
        return fn

    return deco


@covers("Warning")
def test_exc_warning_for_drifted_revision_sql(migrated_url):
    """A session opening a database whose applied revision SQL differs from this build's
    warns with cmbagent_db.Warning (an Exception, per PEP 249, and a warnings category)."""
    import warnings

    with connected(migrated_url) as conn:
        cur = conn.cursor()
        cur.execute("UPDATE cmbagent_db_migrations SET checksum = 'tampered' WHERE revision = '001_session_states'")
        if is_sqlite(migrated_url):
            conn.commit()
        cur.close()
    cmbagent_db.dispose_engines()  # the next session is this URL's first in the process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        db = get_db_session(migrated_url)
    db.close()
    drift = [w for w in caught if issubclass(w.category, cmbagent_db.Warning)]
    assert len(drift) == 1, [str(w.message) for w in caught]
    assert "001_session_states" in str(drift[0].message)
    assert issubclass(cmbagent_db.Warning, Exception)
    with pytest.raises(cmbagent_db.Warning):
        warnings.simplefilter("error", cmbagent_db.Warning)
        cmbagent_db.dispose_engines()
        get_db_session(migrated_url)


@covers("Error", "DatabaseError", "IntegrityError")
def test_exc_integrity_error_fk_and_unique(migrated_url):
    db = get_db_session(migrated_url)
    db.add(WorkflowRun(session_id="no-such-session"))
    with pytest.raises(IntegrityError) as info:
        db.commit()
    assert isinstance(info.value, DatabaseError) and isinstance(info.value, Error)
    db.rollback()
    s = Session(name="p")
    db.add(s)
    db.commit()
    db.add_all([ActiveConnection(task_id="dup", session_id=s.id), ActiveConnection(task_id="dup")])
    with pytest.raises(IntegrityError):
        db.commit()
    db.rollback()
    db.add(ActiveConnection(task_id="dup"))
    db.commit()
    db.add(ActiveConnection(task_id="dup"))
    with pytest.raises(IntegrityError):
        db.commit()
    db.rollback()
    assert row_count(migrated_url, "active_connections") == 1
    db.close()


@covers("InterfaceError")
@pytest.mark.parametrize(
    "url",
    ["not a url", "sqlite:///x.db?bogus=1", "sqlite:///x.db?timeout=soon", "postgresql://",
     "postgresql://u:pw@h/db?nope=1", "sqlite:relative.db"],
)
def test_exc_interface_error(url):
    with pytest.raises(InterfaceError):
        get_db_session(url)


@covers("DataError")
def test_exc_data_error(migrated_url, backend):
    with pytest.raises(DataError, match=r"workflow_runs\.agent"):
        WorkflowRun(session_id="s", agent="a" * 101)
    if backend == "postgresql":
        # The server's own 22xxx: NUL in text.
        db = get_db_session(migrated_url)
        db.add(Session(name="nul\x00"))
        with pytest.raises(DataError):
            db.commit()
        db.rollback()
        db.close()


@covers("OperationalError")
def test_exc_operational_error(backend, tmp_path, pg_server_if_pg):
    if backend == "sqlite":
        garbage = tmp_path / "garbage.db"
        garbage.write_bytes(b"this is not a database file" * 200)
        with pytest.raises(OperationalError):
            get_db_session(f"sqlite:///{garbage}").query(Session).count()
        with pytest.raises(OperationalError):
            get_db_session(f"sqlite:///{tmp_path}/no/such/dir/x.db").query(Session).count()
    else:
        with pytest.raises(OperationalError):
            get_db_session(f"postgresql://u:p@127.0.0.1:{_free_port()}/db?connect_timeout=5")


@pytest.fixture
def pg_server_if_pg(backend, request):
    if backend == "postgresql":
        return request.getfixturevalue("pg_server")
    return None


@covers("OperationalError", "ProgrammingError")
def test_exc_no_such_table(migrated_url, backend):
    """A table dropped underneath: SQLite says OperationalError (as sqlite3 does); on
    PostgreSQL it is SQLSTATE 42P01, class 42 -> ProgrammingError (as psycopg2 does)."""
    with connect_raw(migrated_url) as conn:
        conn.cursor().execute("DROP TABLE active_connections")
    db = get_db_session(migrated_url)
    with pytest.raises(DatabaseError) as info:
        db.query(ActiveConnection).count()
    expected = OperationalError if backend == "sqlite" else ProgrammingError
    assert isinstance(info.value, expected), f"{type(info.value).__name__}: {info.value}"
    assert "active_connections" in str(info.value)
    db.rollback()
    assert db.query(Session).count() == 0
    db.close()


def connect_raw(url):
    import contextlib

    @contextlib.contextmanager
    def cm():
        conn = raw_connect(url)
        try:
            yield conn
        finally:
            conn.close()

    return cm()


@covers("InternalError")
def test_exc_internal_error(migrated_url, backend):
    if backend == "sqlite":
        pytest.skip(
            "InternalError on SQLite maps SQLITE_INTERNAL / SQLITE_MISUSE, which the public "
            "API cannot provoke: unreachable"
        )
    # PostgreSQL reports SQLSTATE class XX (internal_error); a trigger makes the server say so.
    with connect_raw(migrated_url) as conn:
        conn.cursor().execute(
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'internal' USING ERRCODE = 'XX000'; END $$; "
            "CREATE TRIGGER boom BEFORE INSERT ON active_connections "
            "FOR EACH ROW EXECUTE FUNCTION boom()"
        )
    db = get_db_session(migrated_url)
    db.add(ActiveConnection(task_id="t"))
    with pytest.raises(cmbagent_db.InternalError):
        db.commit()
    db.rollback()
    db.close()


@covers("ProgrammingError")
def test_exc_programming_error(migrated_url, backend):
    if backend == "sqlite":
        pytest.skip(
            "on SQLite every SQL error is SQLITE_ERROR, which the contract maps to "
            "OperationalError; ProgrammingError is PostgreSQL's 42xxx only"
        )
    # Schema drift: a column the model has was dropped by someone else -> 42703.
    with connect_raw(migrated_url) as conn:
        conn.cursor().execute("ALTER TABLE active_connections DROP COLUMN server_instance")
    db = get_db_session(migrated_url)
    with pytest.raises(ProgrammingError):
        db.query(ActiveConnection).all()
    db.rollback()
    db.close()


@covers("NotSupportedError")
@pytest.mark.parametrize("url", ["mysql://u:p@h/db", "oracle://h/db", "sqlite+aiosqlite:///x.db"])
def test_exc_not_supported(url):
    with pytest.raises(NotSupportedError):
        get_db_session(url)


@covers("MigrationError")
def test_exc_migration_error(migrated_url):
    with pytest.raises(MigrationError):
        cmbagent_db.migrate(migrated_url, "999_no_such_revision")
    db = get_db_session(migrated_url)
    s = Session(name="holds-rows")
    db.add(s)
    db.commit()
    db.close()
    with pytest.raises(MigrationError, match="sessions"):
        cmbagent_db.migrate(migrated_url, "base")
    # A database at a revision this build does not know.
    with connect_raw(migrated_url) as conn:
        conn.cursor().execute("UPDATE alembic_version SET version_num = '999_from_the_future'")
    with pytest.raises(MigrationError):
        cmbagent_db.migrate(migrated_url, "head")


@covers("InvalidRequestError")
def test_exc_invalid_request(migrated_url):
    db = get_db_session(migrated_url)
    with pytest.raises(InvalidRequestError):
        db.query(Session).filter_by(nope=1).all()
    with pytest.raises(InvalidRequestError):
        db.query(Session).order_by("nope").all()
    with pytest.raises(InvalidRequestError):
        db.query(Session).update({"nope": 1})
    db.close()


@covers("NoResultFound", "MultipleResultsFound")
def test_exc_no_result_and_multiple_results(migrated_url):
    db = get_db_session(migrated_url)
    with pytest.raises(NoResultFound):
        db.query(Session).filter(Session.name == "none").one()
    db.add_all([Session(name="twin"), Session(name="twin")])
    db.commit()
    with pytest.raises(MultipleResultsFound):
        db.query(Session).filter(Session.name == "twin").one()
    with pytest.raises(MultipleResultsFound):
        db.query(Session).filter(Session.name == "twin").one_or_none()
    db.close()


@covers("PendingRollbackError")
def test_exc_pending_rollback(migrated_url):
    db = get_db_session(migrated_url)
    db.add(WorkflowRun(session_id="missing"))
    with pytest.raises(IntegrityError):
        db.flush()
    with pytest.raises(PendingRollbackError):
        db.query(Session).count()
    with pytest.raises(PendingRollbackError):
        db.commit()
    db.rollback()
    assert db.query(Session).count() == 0
    db.close()


@covers("StaleDataError")
def test_exc_stale_data(migrated_url):
    db = get_db_session(migrated_url)
    s = Session(name="gone-soon")
    db.add(s)
    db.commit()
    with connect_raw(migrated_url) as conn:
        cur = conn.cursor()
        cur.execute("DELETE FROM sessions")
    s.name = "renamed"
    with pytest.raises(StaleDataError):
        db.commit()
    db.rollback()
    db.close()


# -- approvals -----------------------------------------------------------------------


def _approvals():
    import importlib

    return importlib.import_module("cmbagent_db.approvals")


@needs_approvals
@covers("ApprovalError", "ApprovalNotFound")
def test_exc_approval_not_found(migrated_url):
    approvals = _approvals()
    db = get_db_session(migrated_url)
    with pytest.raises(cmbagent_db.exceptions.ApprovalNotFound) as info:
        approvals.resolve(db, str(uuid.uuid4()), "approved")
    assert isinstance(info.value, cmbagent_db.exceptions.ApprovalError)
    assert isinstance(info.value, LookupError)
    db.close()


@needs_approvals
@covers("ApprovalExpired")
def test_exc_approval_expired(migrated_url):
    approvals = _approvals()
    _, run_id = make_run(migrated_url)
    db = get_db_session(migrated_url)
    req = approvals.request(db, run_id, "plan_approval", {"p": 1}, timeout_seconds=0.3)
    t0 = time.monotonic()
    with pytest.raises(cmbagent_db.exceptions.ApprovalExpired):
        approvals.wait(req.id, timeout=20, url=migrated_url)
    assert time.monotonic() - t0 < 15
    assert fetch_all(migrated_url, "SELECT status FROM approval_requests WHERE id = ?", (req.id,)) == [("expired",)]
    db.close()


@needs_approvals
@covers("ApprovalTimeout")
def test_exc_approval_timeout(migrated_url):
    approvals = _approvals()
    _, run_id = make_run(migrated_url)
    db = get_db_session(migrated_url)
    req = approvals.request(db, run_id, "plan_approval", {"p": 1}, timeout_seconds=300)
    with pytest.raises(cmbagent_db.exceptions.ApprovalTimeout) as info:
        approvals.wait(req.id, timeout=0.3, url=migrated_url)
    assert isinstance(info.value, TimeoutError)
    assert fetch_all(migrated_url, "SELECT status FROM approval_requests WHERE id = ?", (req.id,)) == [("pending",)]
    db.close()


@needs_approvals
@covers("ApprovalCancelled")
def test_exc_approval_cancelled(migrated_url):
    if not hasattr(exc_mod, "ApprovalCancelled"):
        pytest.skip("no ApprovalCancelled class in this build")
    approvals = _approvals()
    _, run_id = make_run(migrated_url)
    db = get_db_session(migrated_url)
    req = approvals.request(db, run_id, "plan_approval", {"p": 1}, timeout_seconds=300)
    assert approvals.cancel(db, req.id) is True
    with pytest.raises(exc_mod.ApprovalCancelled):
        approvals.wait(req.id, timeout=5, url=migrated_url)
    db.close()


def test_every_exception_class_has_a_test():
    import inspect

    classes = {
        n for n, c in vars(exc_mod).items()
        if inspect.isclass(c) and issubclass(c, BaseException) and c.__module__ == exc_mod.__name__
    }
    assert classes - COVERED == set(), f"exception classes without a test here: {sorted(classes - COVERED)}"


@pytest.mark.parametrize("stored", [
    "2026-02-11 09:05:07+1é1",
    "2026-02-11 09:05:07+9999999999999:00",
    "2026-02-11 09:05:07-99:00",
    "9999-12-31 23:59:59-23:00",
])
def test_malformed_timestamp_text_from_another_client_is_a_data_error(sqlite_url, stored):
    """SQLite keeps whatever text another client writes into a timestamp column: reading it
    is a DataError naming the column (it used to panic in the parser), and the session
    goes on."""
    cmbagent_db.migrate(sqlite_url, "head")
    db = get_db_session(sqlite_url)
    s = Session(name="ts")
    db.add(s)
    db.commit()
    fetch_all(sqlite_url, "UPDATE sessions SET last_active_at = ? WHERE id = ?", (stored, s.id))
    db.expunge_all()
    with pytest.raises(DataError, match="last_active_at"):
        # Unreadable text fails the load; a year past 9999 fails on reading the attribute.
        db.get(Session, s.id).last_active_at
    db.rollback()
    assert db.query(Session.name).filter(Session.id == s.id).scalar() == "ts"
    db.close()


def test_a_session_shared_between_threads_refuses_the_second_caller_clearly(migrated_url):
    """A session serves one thread at a time. Threads that share one anyway get an
    InvalidRequestError naming the rule from every method (never a panic, never a
    RuntimeError of the binding), and the session works afterwards."""
    _, run_id = make_run(migrated_url)
    db = get_db_session(migrated_url)
    run = db.get(WorkflowRun, run_id)
    reqs = [approvals.request(db, run.id, "step", {"k": k}, 60) for k in range(8)]
    calls = [
        lambda i: approvals.resolve(db, reqs[i].id, "approved"),
        lambda i: db.query(ApprovalRequest).filter(ApprovalRequest.run_id == run.id).all(),
        lambda i: db.query(ApprovalRequest, WorkflowRun).join(WorkflowRun).all(),
        lambda i: db.query(WorkflowRun).get(run.id),
        lambda i: db.commit(),
        lambda i: db.get(WorkflowRun, run.id),
        lambda i: repr(db),
        lambda i: db.add(Session(name=f"t{i}")),
    ]
    outcomes = collections.Counter()
    errors = []
    barrier = threading.Barrier(12)

    def worker(i):
        barrier.wait()
        for _ in range(30):
            try:
                calls[i % len(calls)](i % 8)
                outcomes["ok"] += 1
            except InvalidRequestError as e:
                assert "one thread at a time" in str(e), str(e)
                outcomes["refused"] += 1
            except BaseException as e:  # a PanicException is a BaseException
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], errors[:5]
    assert outcomes["ok"] > 0
    db.rollback()
    db.commit()
    # Every request was resolved at most once, and the session still works.
    statuses = {r.status for r in db.query(ApprovalRequest).filter(ApprovalRequest.run_id == run.id).populate_existing()}
    assert statuses <= {"pending", "resolved"}
    assert db.get(WorkflowRun, run.id) is not None
    db.close()


FORK_AFTER_POOL_USE = """
import os, sys, time
import cmbagent_db
from cmbagent_db import PendingRollbackError, get_db_session
from cmbagent_db.models import Session
url, hold = sys.argv[1], sys.argv[2] == "hold"
db = get_db_session(url)
db.add(Session(name="before-fork"))
db.commit()
db.close()  # the pool now holds an idle connection
held = None
if hold:  # and a session in the middle of a transaction
    held = get_db_session(url)
    held.add(Session(name="held"))
    held.flush()

def write(who, n):
    for i in range(n):
        d = get_db_session(url)
        d.add(Session(name=f"{who}-{i}"))
        d.commit()
        d.close()

pid = os.fork()
if pid == 0:
    try:
        if held is not None:
            try:
                held.add(Session(name="never"))
                held.commit()
                print("CHILD held committed", flush=True)
            except PendingRollbackError as e:
                assert "before fork()" in str(e), str(e)
                held.rollback()
        write("child", 20)
        os._exit(0)
    except BaseException as e:
        print("CHILD", type(e).__name__, e, flush=True)
        os._exit(1)
write("parent", 20)
if held is not None:
    held.commit()
_, status = os.waitpid(pid, 0)
print("CHILD-EXIT", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_fork_after_pool_use_gives_the_child_its_own_connections(migrated_url, tmp_path):
    """A process that used the pool forks (gunicorn, multiprocessing's fork): parent and
    child write at the same time, and both finish. The child forgets the parent's idle
    connections without closing them; a session inside a transaction at fork() is the
    parent's to finish, and the child's copy must roll back first. Without this, both
    processes hung on PostgreSQL (two conversations on one socket)."""
    hold = "hold" if is_postgresql(migrated_url) else "no-hold"  # SQLite: one writer at a time
    script = write_script(tmp_path, "fork_after_pool_use.py", FORK_AFTER_POOL_USE)
    out = subprocess.run([sys.executable, script, migrated_url, hold],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["CHILD-EXIT", "0"], out.stdout + out.stderr
    names = [n for (n,) in fetch_all(migrated_url, "SELECT name FROM sessions")]
    assert sorted(n for n in names if n.startswith("child-")) == sorted(f"child-{i}" for i in range(20))
    assert sorted(n for n in names if n.startswith("parent-")) == sorted(f"parent-{i}" for i in range(20))
    assert "never" not in names
    assert ("held" in names) == (hold == "hold")


def _our_connections(url):
    """How many connections this process holds to the database: open descriptors of the
    SQLite file, or server backends of the PostgreSQL database other than the counting one."""
    if is_sqlite(url):
        path = os.path.realpath(sqlite_path(url))
        fds = os.listdir("/proc/self/fd")
        return sum(1 for fd in fds if os.path.realpath(f"/proc/self/fd/{fd}") == path)
    dbname = urlsplit(url).path.lstrip("/")
    sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = ? AND pid <> pg_backend_pid()"
    return fetch_all(url, sql, (dbname,))[0][0]


def test_dispose_engines_closes_idle_connections_at_once(migrated_url):
    """dispose_engines() closes the connections it owns at once, even while closed
    sessions are still referenced; a session inside a transaction gives its connection
    back closed; sessions used afterwards still work and keep nothing open."""
    closed = get_db_session(migrated_url)
    assert closed.query(Session).count() == 0
    closed.close()  # its connection is idle in the pool; the object stays alive
    assert _our_connections(migrated_url) >= 1
    cmbagent_db.dispose_engines()
    assert _our_connections(migrated_url) == 0
    held = get_db_session(migrated_url)
    held.add(Session(name="held"))
    held.flush()  # holds a connection inside a transaction
    assert _our_connections(migrated_url) == 1
    cmbagent_db.dispose_engines()
    assert _our_connections(migrated_url) == 1  # still the held session's
    held.commit()
    assert _our_connections(migrated_url) == 0
    # Both sessions keep working, on a connection for each use.
    assert closed.query(Session.name).filter(Session.name == "held").scalar() == "held"
    assert held.query(Session).count() == 1
    assert _our_connections(migrated_url) == 0
    closed.close()
    held.close()


@pytest.mark.parametrize("param", ["mode=ro", "immutable=1"])
def test_read_only_sqlite_urls_read_and_refuse_every_write(sqlite_url, param):
    """``?mode=ro`` / ``?immutable=1``: sessions read a migrated database; any write is an
    OperationalError saying why, and nothing changes in the file."""
    cmbagent_db.migrate(sqlite_url, "head")
    db = get_db_session(sqlite_url)
    db.add(Session(name="kept"))
    db.commit()
    db.close()
    cmbagent_db.dispose_engines()
    ro_url = f"{sqlite_url}?{param}"
    ro = get_db_session(ro_url)
    assert [s.name for s in ro.query(Session).all()] == ["kept"]
    ro.add(Session(name="refused"))
    with pytest.raises(OperationalError, match="read-only"):
        ro.commit()
    ro.rollback()
    s = ro.query(Session).one()
    s.name = "changed"
    with pytest.raises(OperationalError, match="read-only"):
        ro.commit()
    ro.rollback()
    with pytest.raises(OperationalError, match="read-only"):
        ro.query(Session).delete()
    ro.rollback()
    assert ro.query(Session.name).scalar() == "kept"
    ro.close()
    cmbagent_db.dispose_engines()
    assert fetch_all(sqlite_url, "SELECT name FROM sessions") == [("kept",)]


def test_a_read_only_url_needs_an_existing_database_at_head(tmp_path):
    missing = f"sqlite:///{tmp_path / 'missing.db'}?mode=ro"
    with pytest.raises(OperationalError, match="does not exist"):
        get_db_session(missing).query(Session).count()
    old = f"sqlite:///{tmp_path / 'old.db'}"
    cmbagent_db.migrate(old, "001_session_states")
    cmbagent_db.dispose_engines()
    with pytest.raises(MigrationError, match="read-only.*migrate it through a writable URL"):
        get_db_session(old + "?mode=ro")
    with pytest.raises(InterfaceError, match="mode="):
        get_db_session(old + "?mode=rwx")

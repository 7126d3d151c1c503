"""The one watcher per database per process behind ``approvals.wait`` and
``approvals.wait_async`` (src/watch.rs), on SQLite and PostgreSQL:

- hundreds of ``wait_async`` in one event loop and a hundred ``wait`` threads cost no
  thread and, on PostgreSQL, no server connection per waiter (one for the watcher);
  the one request resolved among them wakes its waiter alone and at once;
- a deleted request wakes its waiters with ApprovalNotFound at once; a database at a
  revision before 004 (no change log, no deletion trigger) still wakes every waiter;
- killing the watcher's server connection loses no waiter;
- a thousand waiters lose none to a PostgreSQL restart, to their LISTEN connection being
  terminated, or to a PgBouncer restart: each wakes within 2 s of its request being resolved
  after recovery;
- a child made by ``fork()`` while the parent waits gets a watcher of its own (the
  watcher's thread, polling SQLite every 2 ms, is kept out of SQLite across the fork: a
  child that inherited SQLite's locks mid-call would hang).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List

import pytest

import cmbagent_db
import pg_throwaway
from cmbagent_db import (
    ApprovalNotFound, ApprovalTimeout, OperationalError, approvals, get_db_session,
)
from cmbagent_db.models import Session, WorkflowRun

from helpers import fetch_all, is_postgresql, raw_connect


@pytest.fixture
def run_id(parents) -> str:
    return parents[1]


def native_threads() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def server_connections(url: str) -> int:
    """Server connections to ``url``'s database other than the one asking."""
    return fetch_all(url, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                     "current_database() AND pid <> pg_backend_pid()")[0][0]


def sql(url: str, statement: str, params: tuple = ()) -> None:
    conn = raw_connect(url)
    try:
        statement = statement.replace("?", "%s") if is_postgresql(url) else statement
        conn.cursor().execute(statement, params)
        conn.commit()
    finally:
        conn.close()


def test_many_async_waiters_share_one_watcher(db, run_id, migrated_url):
    reqs = [approvals.request(db, run_id, "plan_approval", {"n": i}, 120) for i in range(300)]
    db.close()
    threads_before = native_threads()

    async def main() -> Any:
        tasks = [asyncio.create_task(approvals.wait_async(r.id, 60, url=migrated_url))
                 for r in reqs]
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in tasks)
        seen = {"threads": native_threads(), "python_threads": threading.active_count()}
        if is_postgresql(migrated_url):
            seen["connections"] = await asyncio.to_thread(server_connections, migrated_url)
        # Only the last request is resolved: its waiter wakes alone, promptly.
        at = time.monotonic()
        await asyncio.to_thread(sql, migrated_url,
                                "UPDATE approval_requests SET status = 'resolved', "
                                "resolution = 'approved' WHERE id = ?", (reqs[-1].id,))
        last = await asyncio.wait_for(tasks[-1], 10)
        seen["lag"] = time.monotonic() - at
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in tasks[:-1])
        # Then all the others, in one statement.
        await asyncio.to_thread(sql, migrated_url,
                                "UPDATE approval_requests SET status = 'resolved', "
                                "resolution = 'rejected' WHERE status = 'pending'")
        rest = await asyncio.wait_for(asyncio.gather(*tasks[:-1]), 20)
        return last, rest, seen

    last, rest, seen = asyncio.run(main())
    assert last.id == reqs[-1].id and last.resolution == "approved"
    assert sorted(r.id for r in rest) == sorted(r.id for r in reqs[:-1])
    assert {r.resolution for r in rest} == {"rejected"}
    assert seen["lag"] < 1.0, seen
    # No thread per waiter: the watcher's (and asyncio.to_thread's none yet).
    assert seen["threads"] <= threads_before + 2, seen
    if is_postgresql(migrated_url):
        # The watcher's connection, and at most the pool's one idle connection.
        assert seen["connections"] <= 2, seen


def test_many_waiting_threads_share_one_connection(db, run_id, migrated_url):
    reqs = [approvals.request(db, run_id, "plan_approval", {}, 120) for _ in range(100)]
    out: List[Any] = []
    errors: List[BaseException] = []

    def wait(i: str) -> None:
        try:
            out.append(approvals.wait(i, 30, url=migrated_url))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(r.id,)) for r in reqs]
    for t in threads:
        t.start()
    time.sleep(0.5)
    if is_postgresql(migrated_url):
        assert server_connections(migrated_url) <= 2
    sql(migrated_url, "UPDATE approval_requests SET status = 'cancelled' WHERE status = 'pending'")
    for t in threads:
        t.join(20)
    # Cancelled: every one of them raised ApprovalCancelled.
    assert out == [] and len(errors) == 100
    assert {type(e).__name__ for e in errors} == {"ApprovalCancelled"}


SLOW_FSYNC = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <unistd.h>
static int slowly(const char *name, int fd) {
    usleep(300000);
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, name);
    return real(fd);
}
int fsync(int fd) { return slowly("fsync", fd); }
int fdatasync(int fd) { return slowly("fdatasync", fd); }
"""

RESOLVE_AND_SAY_WHEN = r"""
import sys, time
from cmbagent_db import approvals, get_db_session
db = get_db_session(sys.argv[1])
assert approvals.resolve(db, sys.argv[2], "approved") is True
print(time.time())
"""


def test_a_commit_behind_a_slow_fsync_wakes_its_waiter_at_once(sqlite_url, tmp_path):
    """A commit writes its WAL frames, syncs them, and only then publishes them: with a
    300 ms fsync (LD_PRELOAD in the resolving process), the waiter still wakes within a few
    milliseconds of the commit returning, not at the next look of every 250 ms."""
    shim = tmp_path / "slow_fsync.so"
    (tmp_path / "slow_fsync.c").write_text(SLOW_FSYNC)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(shim),
                    str(tmp_path / "slow_fsync.c"), "-ldl"], check=True)
    run_id = new_run(sqlite_url)
    db = get_db_session(sqlite_url)
    lags = []
    for _ in range(3):
        req = approvals.request(db, run_id, "plan_approval", {}, 120)
        woke: List[float] = []
        waiter = threading.Thread(
            target=lambda: (approvals.wait(req.id, 30, url=sqlite_url), woke.append(time.time())))
        waiter.start()
        time.sleep(0.3)  # the watcher has read the request and sleeps on the directory
        out = subprocess.run(
            [sys.executable, "-c", RESOLVE_AND_SAY_WHEN, sqlite_url, req.id],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, LD_PRELOAD=str(shim)),
        )
        assert out.returncode == 0, out.stderr
        waiter.join(10)
        assert woke, "the waiter did not wake"
        lags.append(woke[0] - float(out.stdout.split()[-1]))
    db.close()
    assert max(lags) < 0.1, f"wake-ups after each commit returned: {lags}"


def test_a_deleted_request_wakes_its_waiter_with_not_found(db, run_id, migrated_url):
    req = approvals.request(db, run_id, "plan_approval", {}, 120)
    errors: List[BaseException] = []

    def wait() -> None:
        try:
            approvals.wait(req.id, 30, url=migrated_url)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    at = time.monotonic()
    sql(migrated_url, "DELETE FROM approval_requests WHERE id = ?", (req.id,))
    t.join(10)
    assert [type(e) for e in errors] == [ApprovalNotFound]
    # The deletion is logged (SQLite) or notified (PostgreSQL): the waiter hears of it at
    # once, not at the watcher's next look at every request (a second after it started).
    assert time.monotonic() - at < 0.5


def test_a_database_before_the_change_log_still_wakes_its_waiters(db_url):
    """At revision 003 SQLite has no change log and PostgreSQL no deletion trigger: every
    watched request is looked at (on each commit, or every second) instead."""
    cmbagent_db.migrate(db_url, "003_cmbagent_columns")
    url = db_url + ("&" if "?" in db_url else "?") + "auto_migrate=false"
    run_id = new_run(url, migrate=False)
    with get_db_session(url) as session:
        kept, deleted = (approvals.request(session, run_id, "plan_approval", {}, 120)
                         for _ in "ab")
    ends: Dict[str, Any] = {}

    def wait(req_id: str) -> None:
        try:
            ends[req_id] = approvals.wait(req_id, 30, url=url).status
        except BaseException as exc:  # noqa: BLE001
            ends[req_id] = type(exc)

    threads = [threading.Thread(target=wait, args=(i,)) for i in (kept.id, deleted.id)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    at = time.monotonic()
    sql(url, "UPDATE approval_requests SET status = 'resolved', resolution = 'approved' "
             "WHERE id = ?", (kept.id,))
    sql(url, "DELETE FROM approval_requests WHERE id = ?", (deleted.id,))
    for t in threads:
        t.join(10)
    assert ends == {kept.id: "resolved", deleted.id: ApprovalNotFound}
    assert time.monotonic() - at < 2.5
    assert cmbagent_db.current(url) == "003_cmbagent_columns"


def test_the_watchers_connection_killed_loses_no_waiter(db, run_id, migrated_url, backend):
    if backend != "postgresql":
        pytest.skip("a server connection to kill is PostgreSQL's")
    reqs = [approvals.request(db, run_id, "plan_approval", {}, 120) for _ in range(20)]
    out: List[Any] = []

    def wait(i: str) -> None:
        out.append(approvals.wait(i, 30, url=migrated_url).id)

    threads = [threading.Thread(target=wait, args=(r.id,)) for r in reqs]
    for t in threads:
        t.start()
    time.sleep(0.5)
    fetch_all(migrated_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
              "datname = current_database() AND pid <> pg_backend_pid()")
    # Resolved while the watcher has no connection, and after it has a new one.
    for r in reqs[:10]:
        assert approvals.resolve(db, r.id, "approved") is True
    time.sleep(0.5)
    for r in reqs[10:]:
        assert approvals.resolve(db, r.id, "approved") is True
    for t in threads:
        t.join(10)
    assert sorted(out) == sorted(r.id for r in reqs)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_forked_child_gets_a_watcher_of_its_own(db, run_id, migrated_url):
    parent_req = approvals.request(db, run_id, "plan_approval", {}, 120)
    child_req = approvals.request(db, run_id, "plan_approval", {}, 120)
    got: List[str] = []
    waiter = threading.Thread(
        target=lambda: got.append(approvals.wait(parent_req.id, 30, url=migrated_url).id))
    waiter.start()
    time.sleep(0.3)
    pid = os.fork()
    if pid == 0:  # the child: wait on its own request, then leave without cleaning up
        code = 1
        try:
            code = 0 if approvals.wait(child_req.id, 20, url=migrated_url).id == child_req.id else 2
        except BaseException as exc:  # noqa: BLE001 - the parent sees the exit status
            os.write(2, f"child: {exc!r}\n".encode())
        finally:
            os._exit(code)
    time.sleep(0.3)
    assert approvals.resolve(db, child_req.id, "approved") is True
    assert approvals.resolve(db, parent_req.id, "approved") is True
    _, status = os.waitpid(pid, 0)
    waiter.join(10)
    assert os.WEXITSTATUS(status) == 0
    assert got == [parent_req.id]


def test_a_database_without_the_table_fails_the_wait_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}?auto_migrate=false"
    started = time.monotonic()
    with pytest.raises(OperationalError, match="approval_requests"):
        approvals.wait("any", 10, url=url)
    assert time.monotonic() - started < 2


def test_a_wait_of_no_time_still_reads_the_request_once(db, run_id, migrated_url):
    req = approvals.request(db, run_id, "plan_approval", {}, 120)
    assert approvals.resolve(db, req.id, "approved") is True
    assert approvals.wait(req.id, 0, url=migrated_url).resolution == "approved"
    with pytest.raises(ApprovalNotFound):
        approvals.wait("never-existed", 0, url=migrated_url)
    pending = approvals.request(db, run_id, "plan_approval", {}, 120)
    with pytest.raises(ApprovalTimeout):
        approvals.wait(pending.id, 0, url=migrated_url)


# -- faults with a thousand waiters ------------------------------------------------------

FAULT_WAITERS = 1000


def new_run(url: str, migrate: bool = True) -> str:
    """A committed session and run in the database at ``url`` (first migrated to head,
    unless ``migrate`` is false); the run's id."""
    if migrate:
        cmbagent_db.init_database(url)
    db = get_db_session(url)
    try:
        s = Session(name="faults")
        db.add(s)
        db.commit()
        r = WorkflowRun(session_id=s.id)
        db.add(r)
        db.commit()
        return r.id
    finally:
        db.close()


def waiting_requests(url: str, n: int) -> List[str]:
    run_id = new_run(url)
    db = get_db_session(url)
    try:
        return [approvals.request(db, run_id, "plan_approval", {"i": i}, 600).id for i in range(n)]
    finally:
        db.close()


def resolve_each(url: str, ids: List[str]) -> Dict[str, float]:
    """Resolves every request, one commit each; when each commit returned."""
    db = get_db_session(url)
    at = {}
    try:
        for i in ids:
            assert approvals.resolve(db, i, "approved") is True
            at[i] = time.monotonic()
    finally:
        db.close()
    return at


def lags_through(url: str, ids: List[str], fault: Callable[[], None]) -> List[float]:
    """Every id waited on by ``wait_async`` in one event loop; ``fault`` while they all wait;
    then each request resolved. Returns each waiter's wake-up after its resolve's commit.
    A waiter that errors fails the gather, so none may."""

    async def main() -> List[float]:
        woke: Dict[str, float] = {}

        async def one(i: str) -> None:
            got = await approvals.wait_async(i, 120, url=url)
            assert got.id == i and got.status != "pending"
            woke[i] = time.monotonic()

        tasks = [asyncio.create_task(one(i)) for i in ids]
        await asyncio.sleep(1.0)  # every waiter registered and read once
        await asyncio.to_thread(fault)
        resolved = await asyncio.to_thread(resolve_each, url, ids)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return [woke[i] - resolved[i] for i in ids]

    return asyncio.run(main())


def assert_all_woke_promptly(lags: List[float]) -> None:
    assert len(lags) == FAULT_WAITERS
    slowest = sorted(lags)[-5:]
    assert max(lags) < 2.0, f"slowest wake-ups after their resolve: {slowest}"


def test_a_server_restart_loses_none_of_a_thousand_waiters(restartable_pg_server):
    url = restartable_pg_server.create_database()
    ids = waiting_requests(url, FAULT_WAITERS)
    assert_all_woke_promptly(lags_through(url, ids, restartable_pg_server.restart))


def test_the_watchers_connection_terminated_loses_none_of_a_thousand_waiters(restartable_pg_server):
    url = restartable_pg_server.create_database()
    ids = waiting_requests(url, FAULT_WAITERS)

    def terminate() -> None:
        # The watcher's connection (LISTEN) and the pool's: all of this database's others.
        killed = fetch_all(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                           "datname = current_database() AND pid <> pg_backend_pid()")
        assert killed and all(ok for (ok,) in killed), killed

    assert_all_woke_promptly(lags_through(url, ids, terminate))


def test_a_pgbouncer_restart_loses_none_of_a_thousand_waiters(restartable_pg_server):
    bouncer = pg_throwaway.PgBouncer(restartable_pg_server).start()
    try:
        direct = restartable_pg_server.create_database()
        url = bouncer.url_for(restartable_pg_server.dbname(direct))
        ids = waiting_requests(url, FAULT_WAITERS)
        assert_all_woke_promptly(lags_through(url, ids, bouncer.restart))
    finally:
        bouncer.stop()

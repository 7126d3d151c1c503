"""``cmbagent_db.connections``: heartbeats upserted atomically (also by 8 processes at
once), TTL-based liveness, ownership and reaping, and bad input.

Every test runs on SQLite and on PostgreSQL (``migrated_url``); the concurrency test uses
real separate processes (``multiprocessing`` with the ``spawn`` context).
"""

from __future__ import annotations

import multiprocessing
import queue as queue_mod
import random
import socket
import time

import pytest

from cmbagent_db import DataError, IntegrityError, connections, get_db_session
from cmbagent_db.models import ActiveConnection, Session

from helpers import fetch_all, row_count

CTX = multiprocessing.get_context("spawn")
HB_PROCS = 8
HB_ROUNDS = 4
HB_TASKS = 10


@pytest.fixture
def session_id(db):
    s = Session(name="connections-test")
    db.add(s)
    db.commit()
    return s.id


def rows(url):
    return fetch_all(
        url,
        "SELECT task_id, id, session_id, server_instance FROM active_connections ORDER BY task_id",
    )


# ---------------------------------------------------------------- heartbeat


def test_heartbeat_inserts_then_refreshes(db, migrated_url, session_id):
    first = connections.heartbeat(db, "task-1")
    assert isinstance(first, ActiveConnection)
    assert first.task_id == "task-1"
    assert first.server_instance == socket.gethostname()
    assert first.session_id is None
    assert first.last_heartbeat is not None and first.connected_at is not None
    row_id, beat1, connected = first.id, first.last_heartbeat, first.connected_at
    assert rows(migrated_url) == [("task-1", row_id, None, socket.gethostname())]

    time.sleep(0.05)
    second = connections.heartbeat(db, "task-1", session_id=session_id)
    assert second.id == row_id
    assert second.last_heartbeat > beat1
    assert second.connected_at == connected
    assert second.session_id == session_id
    beat2 = second.last_heartbeat
    # a heartbeat without a session keeps the stored one; another instance takes it over
    time.sleep(0.05)
    third = connections.heartbeat(db, "task-1", server_instance="instance-b")
    assert third.id == row_id
    assert third.last_heartbeat > beat2
    assert third.session_id == session_id
    assert third.server_instance == "instance-b"
    assert rows(migrated_url) == [("task-1", row_id, session_id, "instance-b")]
    assert row_count(migrated_url, "active_connections") == 1


def test_disconnect(db, migrated_url):
    connections.heartbeat(db, "task-1", server_instance="a")
    connections.heartbeat(db, "task-2", server_instance="a")
    assert connections.disconnect(db, "task-1") is True
    assert connections.disconnect(db, "task-1") is False
    assert connections.disconnect(db, "never-seen") is False
    assert [r[0] for r in rows(migrated_url)] == ["task-2"]
    # a disconnected task can connect again (new row)
    again = connections.heartbeat(db, "task-1", server_instance="b")
    assert connections.owner(db, "task-1", 60) == "b"
    assert row_count(migrated_url, "active_connections") == 2
    assert again.task_id == "task-1"


def test_release_instance(db, migrated_url):
    for t in ("a1", "a2", "a3"):
        connections.heartbeat(db, t, server_instance="inst-a")
    for t in ("b1", "b2"):
        connections.heartbeat(db, t, server_instance="inst-b")
    assert connections.release_instance(db, "inst-a") == 3
    assert [r[0] for r in rows(migrated_url)] == ["b1", "b2"]
    assert connections.release_instance(db, "inst-a") == 0
    assert connections.release_instance(db, "no-such-instance") == 0
    assert connections.release_instance(db, "inst-b") == 2
    assert row_count(migrated_url, "active_connections") == 0


def test_live_and_owner_honour_the_ttl(db, migrated_url, session_id):
    connections.heartbeat(db, "old", server_instance="x", session_id=session_id)
    connections.heartbeat(db, "other-session", server_instance="y")
    time.sleep(0.35)
    connections.heartbeat(db, "fresh", server_instance="z", session_id=session_id)

    assert [c.task_id for c in connections.live(db, 0.2)] == ["fresh"]
    assert [c.task_id for c in connections.live(db, 30)] == ["fresh", "old", "other-session"]
    assert [c.task_id for c in connections.live(db, 30, session_id=session_id)] == [
        "fresh",
        "old",
    ]
    assert [c.task_id for c in connections.live(db, 0.2, session_id=session_id)] == ["fresh"]
    assert all(isinstance(c, ActiveConnection) for c in connections.live(db, 30))

    assert connections.owner(db, "fresh", 0.2) == "z"
    assert connections.owner(db, "old", 0.2) is None
    assert connections.owner(db, "old", 30) == "x"
    assert connections.owner(db, "never-seen", 30) is None

    # a heartbeat brings a stale task back
    connections.heartbeat(db, "old", server_instance="x2")
    assert connections.owner(db, "old", 0.2) == "x2"
    # reading removes nothing
    assert row_count(migrated_url, "active_connections") == 3


def test_reap_stale_removes_only_stale_rows(db, migrated_url):
    for t in ("s1", "s2", "s3"):
        connections.heartbeat(db, t, server_instance="crashed")
    time.sleep(0.35)
    for t in ("f1", "f2"):
        connections.heartbeat(db, t, server_instance="alive")
    connections.heartbeat(db, "s3", server_instance="alive")  # s3 refreshed: not stale

    assert connections.reap_stale(db, 30) == []
    assert row_count(migrated_url, "active_connections") == 5
    reaped = connections.reap_stale(db, 0.2)
    assert sorted(reaped) == ["s1", "s2"]
    assert [r[0] for r in rows(migrated_url)] == ["f1", "f2", "s3"]
    assert connections.reap_stale(db, 0.2) == []
    assert connections.owner(db, "s1", 30) is None


def test_heartbeat_with_missing_session_is_an_integrity_error(db, migrated_url, session_id):
    with pytest.raises(IntegrityError):
        connections.heartbeat(db, "task-x", session_id="no-such-session")
    assert row_count(migrated_url, "active_connections") == 0
    db.rollback()
    # the session works after rollback
    ok = connections.heartbeat(db, "task-x", session_id=session_id)
    assert ok.session_id == session_id
    assert rows(migrated_url) == [("task-x", ok.id, session_id, socket.gethostname())]
    # a refresh naming a missing session is refused too, and leaves the row as it was
    with pytest.raises(IntegrityError):
        connections.heartbeat(db, "task-x", session_id="no-such-session")
    db.rollback()
    assert rows(migrated_url) == [("task-x", ok.id, session_id, socket.gethostname())]


# ---------------------------------------------------------------- heartbeat_many


def test_heartbeat_many_refreshes_and_inserts_in_one_call(db, migrated_url, session_id):
    kept = connections.heartbeat(db, "t0000", session_id=session_id, server_instance="old")
    tasks = [f"t{i:04d}" for i in range(2500)]
    assert connections.heartbeat_many(db, tasks, server_instance="w2") == 2500
    got = rows(migrated_url)
    assert [r[0] for r in got] == tasks
    # The existing row keeps its id and, with no session ids given, its session.
    assert got[0] == ("t0000", kept.id, session_id, "w2")
    assert {r[3] for r in got} == {"w2"}
    assert len({r[1] for r in got}) == 2500
    stamps = fetch_all(migrated_url, "SELECT DISTINCT last_heartbeat FROM active_connections")
    assert len(stamps) == 1
    # Session ids, one per task (None keeps the stored one); a task named twice counts once
    # with its last session id.
    n = connections.heartbeat_many(db, ["t0001", "t0000", "t0001"],
                                   session_ids=[None, None, session_id], server_instance="w3")
    assert n == 2
    got = {r[0]: r for r in rows(migrated_url)}
    assert got["t0000"][2:] == (session_id, "w3")
    assert got["t0001"][2:] == (session_id, "w3")
    assert connections.heartbeat_many(db, []) == 0
    # Refreshed rows are live; a reap with a short TTL takes them all at once.
    assert connections.owner(db, "t2499", ttl_seconds=30) == "w2"


def test_heartbeat_many_bad_input_writes_nothing(db, migrated_url, session_id):
    with pytest.raises(TypeError, match="not one string"):
        connections.heartbeat_many(db, "task-1")
    with pytest.raises(TypeError):
        connections.heartbeat_many(db, ["a", None])
    with pytest.raises(ValueError, match="one session id"):
        connections.heartbeat_many(db, ["a", "b"], session_ids=[session_id])
    with pytest.raises(DataError, match="100 characters"):
        connections.heartbeat_many(db, ["a", "x" * 101])
    assert row_count(migrated_url, "active_connections") == 0
    # A missing session fails the whole statement: no row of the call is written.
    with pytest.raises(IntegrityError):
        connections.heartbeat_many(db, ["a", "b"], session_ids=[session_id, "no-such"])
    db.rollback()
    assert row_count(migrated_url, "active_connections") == 0
    assert connections.heartbeat_many(db, ["a", "b"], session_ids=[session_id, None]) == 2
    assert [r[0] for r in rows(migrated_url)] == ["a", "b"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [-1, -0.001, float("nan"), float("-inf")])
def test_negative_ttls_are_refused(db, migrated_url, bad):
    connections.heartbeat(db, "task-1", server_instance="a")
    time.sleep(0.01)
    with pytest.raises(ValueError):
        connections.reap_stale(db, bad)
    with pytest.raises(ValueError):
        connections.live(db, bad)
    with pytest.raises(ValueError):
        connections.owner(db, "task-1", bad)
    # nothing removed, and the session still works without a rollback
    assert row_count(migrated_url, "active_connections") == 1
    assert connections.owner(db, "task-1", 60) == "a"


@pytest.mark.parametrize("bad", [True, "30", None])
def test_non_numeric_ttls_are_refused(db, migrated_url, bad):
    connections.heartbeat(db, "task-1", server_instance="a")
    with pytest.raises(TypeError):
        connections.reap_stale(db, bad)
    with pytest.raises(TypeError):
        connections.live(db, bad)
    assert row_count(migrated_url, "active_connections") == 1


def test_zero_ttl(db, migrated_url):
    connections.heartbeat(db, "task-1", server_instance="a")
    time.sleep(0.02)
    assert connections.live(db, 0) == []
    assert connections.owner(db, "task-1", 0) is None
    assert connections.reap_stale(db, 0) == ["task-1"]


# ----------------------------------------------------- 8 processes heartbeating


def _heartbeater(url, k, barrier, out_q):
    db = get_db_session(url)
    connections.live(db, 60)  # open the connection before the first round
    errors = []
    beats = 0
    try:
        for r in range(HB_ROUNDS):
            # new task ids every round (all processes race on the first insert) and a
            # shared set refreshed every round
            ids = [f"new-{r}-{j}" for j in range(HB_TASKS)]
            ids += [f"shared-{j}" for j in range(HB_TASKS)]
            random.Random(k * 1000 + r).shuffle(ids)
            barrier.wait(timeout=120)
            for t in ids:
                try:
                    c = connections.heartbeat(db, t, server_instance=f"inst-{k}")
                    if c.task_id != t or c.server_instance != f"inst-{k}":
                        errors.append(f"returned {c.task_id}/{c.server_instance} for {t}")
                    beats += 1
                except Exception as exc:
                    errors.append(f"{t}: {exc!r}")
                    try:
                        db.rollback()
                    except Exception:
                        pass
    finally:
        out_q.put((k, beats, errors))
        db.close()


def test_concurrent_heartbeats_from_8_processes(migrated_url):
    barrier = CTX.Barrier(HB_PROCS)
    out_q = CTX.Queue()
    procs = [
        CTX.Process(target=_heartbeater, args=(migrated_url, k, barrier, out_q))
        for k in range(HB_PROCS)
    ]
    for p in procs:
        p.start()
    reports = []
    try:
        for _ in procs:
            try:
                reports.append(out_q.get(timeout=180))
            except queue_mod.Empty:
                pytest.fail("a heartbeating process did not report")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    errors = [e for _, _, errs in reports for e in errs]
    assert errors == [], errors[:10]
    assert sum(b for _, b, _ in reports) == HB_PROCS * HB_ROUNDS * 2 * HB_TASKS

    expected = sorted(
        [f"new-{r}-{j}" for r in range(HB_ROUNDS) for j in range(HB_TASKS)]
        + [f"shared-{j}" for j in range(HB_TASKS)]
    )
    got = rows(migrated_url)
    assert [r[0] for r in got] == expected  # exactly one row per task
    assert len({r[1] for r in got}) == len(expected)
    instances = {f"inst-{k}" for k in range(HB_PROCS)}
    assert all(r[3] in instances for r in got)
    n = fetch_all(
        migrated_url,
        "SELECT COUNT(*), COUNT(DISTINCT task_id) FROM active_connections",
    )[0]
    assert tuple(n) == (len(expected), len(expected))

"""``cmbagent_db.approvals``: resolve exactly once across processes, wait woken by the
database (also by a plain SQL UPDATE from another client), expiry, and bad input.

Every test runs on SQLite and on PostgreSQL (``migrated_url``). The concurrency tests use
real separate processes (``multiprocessing`` with the ``spawn`` context), never threads.

The wake-up latency figures (median / 95th percentile per backend, and for a plain SQL
UPDATE) are printed (run pytest with ``-s`` to see them) and written to
``/tmp/wake_latency.txt``; the tests only assert loose bounds on them.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import queue as queue_mod
import signal
import statistics
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from cmbagent_db import (
    ApprovalCancelled,
    ApprovalError,
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalTimeout,
    DataError,
    approvals,
    get_db_session,
    init_database,
)
from cmbagent_db.models import ApprovalRequest, Session, WorkflowRun

from helpers import fetch_all, is_sqlite, raw_connect, row_count

UTC = timezone.utc
CTX = multiprocessing.get_context("spawn")
RESOLUTIONS = ("approved", "rejected", "modified")
LATENCY_FILE = "/tmp/wake_latency.txt"

# Rounds of the 8-process resolve race, per backend.
RACE_ROUNDS = 30
RACE_PROCS = 8
# Waiter / resolver trials per backend.
LATENCY_TRIALS = 50
SQL_UPDATE_TRIALS = 10


# --------------------------------------------------------------------------- helpers


def utcnow() -> datetime:
    return datetime.now(UTC)


def db_ts(url: str, dt: datetime):
    """A timestamp as a raw driver parameter: SQLite stores naive UTC text."""
    if is_sqlite(url):
        return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return dt


def as_json(value):
    return json.loads(value) if isinstance(value, str) else value


def row(url: str, approval_id: str) -> dict:
    rows = fetch_all(
        url,
        "SELECT status, resolution, result, resolved_at, expires_at "
        "FROM approval_requests WHERE id = ?",
        (approval_id,),
    )
    assert len(rows) == 1, rows
    status, resolution, result, resolved_at, expires_at = rows[0]
    return {
        "status": status,
        "resolution": resolution,
        "result": as_json(result),
        "resolved_at": resolved_at,
        "expires_at": expires_at,
    }


def set_expires(url: str, approval_id: str, dt: datetime) -> None:
    fetch_all(
        url,
        "UPDATE approval_requests SET expires_at = ? WHERE id = ?",
        (db_ts(url, dt), approval_id),
    )


def percentile(values, q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


_LATENCY: dict = {}


def record_latency(key: str, values, commit_durations) -> str:
    med = statistics.median(values)
    p95 = percentile(values, 0.95)
    line = (
        f"{key}: n={len(values)} median={med * 1000:.2f} ms p95={p95 * 1000:.2f} ms "
        f"min={min(values) * 1000:.2f} ms max={max(values) * 1000:.2f} ms "
        f"(resolver call itself: median {statistics.median(commit_durations) * 1000:.2f} ms)"
    )
    _LATENCY[key] = line
    with open(LATENCY_FILE, "w") as f:
        f.write("# wake-up latency: waiter's wait() return - resolver's commit return\n")
        for k in sorted(_LATENCY):
            f.write(_LATENCY[k] + "\n")
    print("\n" + line)
    return line


def get(q, timeout: float, what: str):
    try:
        return q.get(timeout=timeout)
    except queue_mod.Empty:
        pytest.fail(f"no report from {what} within {timeout}s")


def stop_all(procs) -> None:
    for p in procs:
        p.join(timeout=10)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


# ---------------------------------------------------------- process entry points
# (module level, so that the spawn context can import them)


def _race_resolver(url, ids, k, barrier, out_q):
    db = get_db_session(url)
    approvals.pending(db)  # open the connection before the first round
    resolution = RESOLUTIONS[k % len(RESOLUTIONS)]
    try:
        for r, aid in enumerate(ids):
            barrier.wait(timeout=120)
            try:
                won = approvals.resolve(db, aid, resolution, {"worker": k, "round": r})
                out_q.put((r, k, won, None))
            except Exception as exc:  # reported, asserted by the parent
                out_q.put((r, k, None, repr(exc)))
                try:
                    db.rollback()
                except Exception:
                    pass
    finally:
        db.close()


def _latency_waiter(url, ids, ready_q, out_q):
    for i, aid in enumerate(ids):
        ready_q.put(i)
        try:
            got = approvals.wait(aid, 30, url=url)
            t = time.time()
            out_q.put(("ok", i, t, got.id, got.status, got.resolution, got.result))
        except Exception as exc:
            out_q.put(("err", i, time.time(), repr(exc), None, None, None))


def _latency_resolver(url, ids, ready_q, out_q, mode, delay):
    """mode 'api': approvals.resolve; mode 'sql': a plain UPDATE over sqlite3 / psycopg2."""
    db = conn = None
    if mode == "api":
        db = get_db_session(url)
        approvals.pending(db)
    else:
        conn = raw_connect(url)
    ph = "?" if is_sqlite(url) else "%s"
    try:
        for i, aid in enumerate(ids):
            ready_q.get(timeout=60)
            time.sleep(delay)  # let the waiter block in wait()
            resolution = RESOLUTIONS[i % len(RESOLUTIONS)]
            result = {"trial": i, "by": mode}
            start = time.time()
            if mode == "api":
                ok = approvals.resolve(db, aid, resolution, result)
            else:
                now = datetime.now(UTC)
                cur = conn.cursor()
                cur.execute(
                    f"UPDATE approval_requests SET status = 'resolved', resolution = {ph}, "
                    f"result = {ph}, resolved_at = {ph} WHERE id = {ph} AND status = 'pending'",
                    (resolution, json.dumps(result), db_ts(url, now), aid),
                )
                ok = cur.rowcount == 1
                cur.close()
            end = time.time()
            out_q.put((i, start, end, ok))
    finally:
        if db is not None:
            db.close()
        if conn is not None:
            conn.close()


def _blocking_waiter(url, id_q, timeout, out_q):
    out_q.put(("up", time.time(), None))
    aid = id_q.get(timeout=60)
    out_q.put(("started", time.time(), None))
    try:
        approvals.wait(aid, timeout, url=url)
        out_q.put(("returned", time.time(), None))
    except Exception as exc:
        out_q.put((type(exc).__name__, time.time(), str(exc)))


def _doomed_resolver(url, id_q, out_q):
    """Opens a session, holds an uncommitted change to the request's row (a write lock on
    SQLite, a row lock on PostgreSQL), and never resolves: it is SIGKILLed."""
    db = get_db_session(url)
    approvals.pending(db)
    conn = raw_connect(url)
    out_q.put("up")
    aid = id_q.get(timeout=60)
    cur = conn.cursor()
    if is_sqlite(url):
        cur.execute("BEGIN IMMEDIATE")
        cur.execute(
            "UPDATE approval_requests SET resolution = 'approved' WHERE id = ?", (aid,)
        )
    else:
        cur.execute("BEGIN")
        cur.execute(
            "UPDATE approval_requests SET resolution = 'approved' WHERE id = %s", (aid,)
        )
    out_q.put("holding")
    time.sleep(600)


def _go_resolver(url, aid, go_q, out_q):
    db = get_db_session(url)
    approvals.pending(db)
    out_q.put("ready")
    go_q.get(timeout=60)
    out_q.put(approvals.resolve(db, aid, "modified", {"edited": [1, 2, 3]}))
    db.close()


# ------------------------------------------------------------------ lifecycle


def test_request_resolve_roundtrip(db, parents, migrated_url):
    sid, rid = parents
    req = approvals.request(db, rid, "plan_approval", {"plan": [1, 2]}, 60, session_id=sid)
    assert req.status == "pending"
    # committed: another connection sees it
    assert row(migrated_url, req.id)["status"] == "pending"
    before = utcnow()
    assert approvals.resolve(db, req.id, "modified", {"plan": [2, 1], "note": "ü"}) is True
    r = row(migrated_url, req.id)
    assert r["status"] == "resolved"
    assert r["resolution"] == "modified"
    assert r["result"] == {"plan": [2, 1], "note": "ü"}
    assert r["resolved_at"] is not None
    # the tracked object is refreshed
    assert req.status == "resolved" and req.resolution == "modified"
    assert req.resolved_at >= before - timedelta(seconds=1)
    # second resolution and a cancel lose; the row keeps the first
    assert approvals.resolve(db, req.id, "rejected", {"x": 1}) is False
    assert approvals.cancel(db, req.id) is False
    r2 = row(migrated_url, req.id)
    assert (r2["status"], r2["resolution"], r2["result"]) == (
        "resolved",
        "modified",
        {"plan": [2, 1], "note": "ü"},
    )


def test_cancel(db, parents, migrated_url):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    assert approvals.cancel(db, req.id) is True
    assert row(migrated_url, req.id)["status"] == "cancelled"
    assert approvals.cancel(db, req.id) is False
    assert approvals.resolve(db, req.id, "approved") is False
    assert row(migrated_url, req.id)["status"] == "cancelled"
    assert row(migrated_url, req.id)["resolution"] is None


# ------------------------------------------------------------ scoped resolution


def one_result_each(procs, out_q, what):
    """Starts ``procs`` and returns the one result each puts on ``out_q``."""
    for p in procs:
        p.start()
    try:
        return [get(out_q, 120, what) for _ in procs]
    finally:
        stop_all(procs)


def _two_sessions_requests(db):
    """Two chat sessions with a run and a pending request each: [(sid, rid, request)]."""
    out = []
    for name in ("alice", "bob"):
        s = Session(name=name)
        db.add(s)
        db.commit()
        r = WorkflowRun(session_id=s.id)
        db.add(r)
        db.commit()
        out.append((s.id, r.id, approvals.request(db, r.id, "plan_approval", {"who": name},
                                                  60, session_id=s.id)))
    return out


def test_a_scoped_resolve_answers_another_sessions_request_as_an_unknown_id(db, migrated_url):
    (a_sid, a_rid, a_req), (b_sid, b_rid, b_req) = _two_sessions_requests(db)
    for scope in ({"session_id": b_sid}, {"run_id": b_rid}, {"session_id": a_sid, "run_id": b_rid}):
        with pytest.raises(ApprovalNotFound) as other:
            approvals.resolve(db, a_req.id, "approved", **scope)
        with pytest.raises(ApprovalNotFound) as unknown:
            approvals.resolve(db, "no-such-id", "approved", **scope)
        assert str(other.value).replace(a_req.id, "ID") == str(unknown.value).replace("no-such-id", "ID")
        with pytest.raises(ApprovalNotFound):
            approvals.cancel(db, a_req.id, **scope)
    assert row(migrated_url, a_req.id)["status"] == "pending"
    assert approvals.resolve(db, a_req.id, "approved", {"ok": 1}, session_id=a_sid, run_id=a_rid)
    assert row(migrated_url, a_req.id)["resolution"] == "approved"
    # Its own session's request already final: False, as without a scope.
    assert approvals.resolve(db, a_req.id, "rejected", session_id=a_sid) is False
    assert approvals.cancel(db, b_req.id, session_id=b_sid) is True
    assert row(migrated_url, b_req.id)["status"] == "cancelled"


def _scoped_racer(url, aid, sid, barrier, out_q):
    db = get_db_session(url)
    approvals.pending(db)
    barrier.wait(timeout=60)
    try:
        out_q.put((sid, approvals.resolve(db, aid, "approved", {"by": sid}, session_id=sid)))
    except ApprovalNotFound:
        out_q.put((sid, "not found"))
    db.close()


def test_racing_resolvers_of_mixed_sessions_leave_one_winner_of_the_right_one(db, migrated_url):
    (a_sid, _, a_req), (b_sid, _, _) = _two_sessions_requests(db)
    sids = [a_sid, b_sid] * 4
    barrier = CTX.Barrier(len(sids))
    out_q = CTX.Queue()
    procs = [CTX.Process(target=_scoped_racer, args=(migrated_url, a_req.id, sid, barrier, out_q))
             for sid in sids]
    results = one_result_each(procs, out_q, "scoped resolvers")
    assert sorted(r for sid, r in results if sid == b_sid) == ["not found"] * 4
    assert sorted(r for sid, r in results if sid == a_sid) == [False, False, False, True]
    assert row(migrated_url, a_req.id)["result"] == {"by": a_sid}


# ------------------------------------------------------------ resolve race


def test_resolve_race_exactly_one_winner(db, parents, migrated_url):
    _, rid = parents
    ids = [
        approvals.request(db, rid, "plan_approval", {"round": r}, 300).id
        for r in range(RACE_ROUNDS)
    ]
    barrier = CTX.Barrier(RACE_PROCS)
    out_q = CTX.Queue()
    procs = [
        CTX.Process(target=_race_resolver, args=(migrated_url, ids, k, barrier, out_q))
        for k in range(RACE_PROCS)
    ]
    for p in procs:
        p.start()
    try:
        results = [get(out_q, 120, "race resolvers") for _ in range(RACE_ROUNDS * RACE_PROCS)]
    finally:
        stop_all(procs)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    errors = [res for res in results if res[3] is not None]
    assert not errors, errors
    by_round = {}
    for r, k, won, _ in results:
        by_round.setdefault(r, []).append((k, won))
    assert sorted(by_round) == list(range(RACE_ROUNDS))
    for r, outcomes in by_round.items():
        assert len(outcomes) == RACE_PROCS
        winners = [k for k, won in outcomes if won is True]
        assert len(winners) == 1, (r, outcomes)
        assert all(won in (True, False) for _, won in outcomes)
        w = winners[0]
        stored = row(migrated_url, ids[r])
        assert stored["status"] == "resolved"
        assert stored["resolution"] == RESOLUTIONS[w % len(RESOLUTIONS)], (r, w, stored)
        assert stored["result"] == {"worker": w, "round": r}, (r, w, stored)
        assert stored["resolved_at"] is not None
    winners_seen = sorted({k for r in by_round for k, won in by_round[r] if won})
    print(
        f"\nresolve race [{migrated_url.split(':')[0]}]: {RACE_ROUNDS} rounds x "
        f"{RACE_PROCS} processes, exactly one winner each; distinct winners {winners_seen}"
    )


# ------------------------------------------------------------ wait / wake-up


def _run_latency(url, ids, mode):
    # let the waiter get into wait() (a PostgreSQL waiter first opens its own connection)
    delay = 0.05 if is_sqlite(url) else 0.1
    ready_q = CTX.Queue()
    wq = CTX.Queue()
    rq = CTX.Queue()
    waiter = CTX.Process(target=_latency_waiter, args=(url, ids, ready_q, wq))
    resolver = CTX.Process(target=_latency_resolver, args=(url, ids, ready_q, rq, mode, delay))
    waiter.start()
    resolver.start()
    try:
        w = [get(wq, 60, "waiter") for _ in ids]
        r = [get(rq, 60, "resolver") for _ in ids]
    finally:
        stop_all([waiter, resolver])
    return w, r


def test_waiter_and_resolver_in_other_processes(db, parents, migrated_url):
    _, rid = parents
    ids = [
        approvals.request(db, rid, "plan_approval", {"trial": i}, 300).id
        for i in range(LATENCY_TRIALS)
    ]
    waits, resolves = _run_latency(migrated_url, ids, "api")
    latencies, durations = [], []
    for (kind, i, t_wait, gid, status, resolution, result), (j, start, end, ok) in zip(
        waits, resolves
    ):
        durations.append(end - start)
        assert kind == "ok", (i, gid)
        assert i == j
        assert ok is True
        assert gid == ids[i]
        assert status == "resolved"
        assert resolution == RESOLUTIONS[i % len(RESOLUTIONS)]
        assert result == {"trial": i, "by": "api"}
        latencies.append(t_wait - end)
    backend = "sqlite" if is_sqlite(migrated_url) else "postgresql"
    record_latency(f"{backend} approvals.resolve", latencies, durations)
    assert statistics.median(latencies) < 1.0
    assert max(latencies) < 5.0


def test_plain_sql_update_wakes_the_waiter(db, parents, migrated_url):
    _, rid = parents
    ids = [
        approvals.request(db, rid, "plan_approval", {"trial": i}, 300).id
        for i in range(SQL_UPDATE_TRIALS)
    ]
    waits, resolves = _run_latency(migrated_url, ids, "sql")
    latencies, durations = [], []
    for (kind, i, t_wait, gid, status, resolution, result), (j, start, end, ok) in zip(
        waits, resolves
    ):
        durations.append(end - start)
        assert kind == "ok", (i, gid)
        assert ok is True
        assert (gid, status, resolution) == (ids[i], "resolved", RESOLUTIONS[i % 3])
        assert result == {"trial": i, "by": "sql"}
        latencies.append(t_wait - end)
    backend = "sqlite" if is_sqlite(migrated_url) else "postgresql"
    record_latency(f"{backend} plain SQL UPDATE", latencies, durations)
    assert statistics.median(latencies) < 1.0
    assert max(latencies) < 5.0


def test_wait_returns_at_once_when_already_resolved(db, parents, migrated_url):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    approvals.resolve(db, req.id, "rejected", ["why", 1])
    t0 = time.monotonic()
    got = approvals.wait(req.id, 10, url=migrated_url)
    assert time.monotonic() - t0 < 1.0
    assert isinstance(got, ApprovalRequest)
    assert (got.id, got.status, got.resolution, got.result) == (
        req.id,
        "resolved",
        "rejected",
        ["why", 1],
    )


# ------------------------------------------------- waiter survives a killed resolver


@pytest.mark.parametrize("case", ["timeout", "expired"])
def test_waiter_survives_killed_resolver(db, parents, migrated_url, case):
    """The resolver holds an uncommitted change to the row (a lock) and is SIGKILLed before
    resolving; the waiter, in a third process, ends as specified and in time."""
    _, rid = parents
    if case == "timeout":
        deadline_s, timeout = 30.0, 1.5
    else:
        deadline_s, timeout = 3.0, 30.0
    id_q_doomed, id_q_waiter = CTX.Queue(), CTX.Queue()
    dq, wq = CTX.Queue(), CTX.Queue()
    doomed = CTX.Process(target=_doomed_resolver, args=(migrated_url, id_q_doomed, dq))
    waiter = CTX.Process(target=_blocking_waiter, args=(migrated_url, id_q_waiter, timeout, wq))
    doomed.start()
    waiter.start()
    try:
        assert get(dq, 60, "doomed resolver") == "up"
        assert get(wq, 60, "waiter")[0] == "up"
        # both processes are running: only now create the request and start its clock
        req = approvals.request(db, rid, "plan_approval", {"case": case}, deadline_s)
        expires_at = req.expires_at.timestamp()
        id_q_doomed.put(req.id)
        assert get(dq, 30, "doomed resolver") == "holding"
        id_q_waiter.put(req.id)
        kind, t_started, _ = get(wq, 30, "waiter start")
        assert kind == "started"
        time.sleep(0.3)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.join(timeout=10)
        assert doomed.exitcode == -signal.SIGKILL
        kind, t_end, msg = get(wq, deadline_s + timeout + 10, "waiter end")
    finally:
        if doomed.is_alive():
            doomed.kill()
        stop_all([waiter, doomed])
    stored = row(migrated_url, req.id)
    if case == "timeout":
        assert kind == "ApprovalTimeout", (kind, msg)
        elapsed = t_end - t_started
        assert timeout - 0.1 <= elapsed <= timeout + 2.0, elapsed
        assert stored["status"] == "pending"
        assert stored["resolution"] is None  # the killed process's change was rolled back
    else:
        assert kind == "ApprovalExpired", (kind, msg)
        late = t_end - expires_at
        assert -0.1 <= late <= 2.0, late
        assert stored["status"] == "expired"
        assert stored["resolution"] is None


def test_waiter_honours_its_timeout_while_the_row_is_locked(db, parents, migrated_url):
    """Another client holds an uncommitted change to the request's row (alive, e.g. a
    session that flushed but has not committed) while the deadline and then the caller's
    timeout pass: the wait still ends by the caller's timeout (ApprovalExpired or
    ApprovalTimeout), rather than hanging on the lock or failing with a lock error."""
    _, rid = parents
    deadline_s, timeout = 1.5, 3.0
    id_q_holder, id_q_waiter = CTX.Queue(), CTX.Queue()
    hq, wq = CTX.Queue(), CTX.Queue()
    holder = CTX.Process(target=_doomed_resolver, args=(migrated_url, id_q_holder, hq))
    waiter = CTX.Process(target=_blocking_waiter, args=(migrated_url, id_q_waiter, timeout, wq))
    holder.start()
    waiter.start()
    try:
        assert get(hq, 60, "lock holder") == "up"
        assert get(wq, 60, "waiter")[0] == "up"
        req = approvals.request(db, rid, "plan_approval", {}, deadline_s)
        id_q_holder.put(req.id)
        assert get(hq, 30, "lock holder") == "holding"
        id_q_waiter.put(req.id)
        kind, t_started, _ = get(wq, 30, "waiter start")
        try:
            kind, t_end, msg = wq.get(timeout=timeout + 5)
        except queue_mod.Empty:
            kind, t_end, msg = "still blocked", time.time(), f"after {timeout + 5}s"
    finally:
        if holder.is_alive():
            holder.kill()
        if waiter.is_alive():
            waiter.kill()
        stop_all([holder, waiter])
    assert kind in ("ApprovalExpired", "ApprovalTimeout"), (kind, msg)
    assert t_end - t_started <= timeout + 2.0, t_end - t_started


def test_timeout_leaves_request_pending_and_resolvable(db, parents, migrated_url):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    t0 = time.monotonic()
    with pytest.raises(ApprovalTimeout) as info:
        approvals.wait(req.id, 0.3, url=migrated_url)
    elapsed = time.monotonic() - t0
    assert isinstance(info.value, TimeoutError)
    assert 0.25 <= elapsed < 2.3
    assert row(migrated_url, req.id)["status"] == "pending"
    assert approvals.resolve(db, req.id, "approved") is True


def test_wait_expires_at_deadline_in_process(db, parents, migrated_url):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 0.6)
    t0 = time.time()
    with pytest.raises(ApprovalExpired):
        approvals.wait(req.id, None, url=migrated_url)
    late = time.time() - req.expires_at.timestamp()
    assert -0.1 <= late <= 2.0, late
    assert row(migrated_url, req.id)["status"] == "expired"
    assert approvals.resolve(db, req.id, "approved") is False
    assert time.time() - t0 < 5


# ------------------------------------------------------------------ asyncio


def test_wait_async_does_not_block_the_loop(db, parents, migrated_url):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    go_q = CTX.Queue()
    out_q = CTX.Queue()
    resolver = CTX.Process(target=_go_resolver, args=(migrated_url, req.id, go_q, out_q))
    resolver.start()
    try:
        assert get(out_q, 60, "resolver") == "ready"

        async def main():
            ticks = []
            stop = asyncio.Event()

            async def ticker():
                while not stop.is_set():
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.01)

            tick_task = asyncio.create_task(ticker())
            started = time.monotonic()
            wait_task = asyncio.create_task(
                approvals.wait_async(req.id, 20, url=migrated_url)
            )
            await asyncio.sleep(0.5)
            assert not wait_task.done(), (
                wait_task.exception() if not wait_task.cancelled() else "cancelled"
            )
            go_q.put("go")
            got = await asyncio.wait_for(wait_task, 15)
            ended = time.monotonic()
            stop.set()
            await tick_task
            return got, [t for t in ticks if started <= t <= ended], started, ended

        got, ticks, started, ended = asyncio.run(main())
        assert get(out_q, 30, "resolver") is True
    finally:
        stop_all([resolver])
    assert (got.id, got.status, got.resolution, got.result) == (
        req.id,
        "resolved",
        "modified",
        {"edited": [1, 2, 3]},
    )
    # the loop kept ticking (every ~10 ms) the whole time the wait was blocked
    # (a wait blocking the loop would stall it until the 20 s timeout: nothing would
    # send "go" to the resolver)
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) >= 20, (len(ticks), ended - started)
    assert max(gaps) < 1.0, (max(gaps), len(ticks), ended - started)


def test_cancelling_wait_async_stops_the_wait(db, parents, migrated_url):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 20)

    async def main():
        task = asyncio.create_task(approvals.wait_async(req.id, None, url=migrated_url))
        await asyncio.sleep(0.4)
        assert not task.done()
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stopped_after = time.monotonic() - cancelled_at
        # A resolution after the cancel reaches no one: the loop gets no callback.
        assert approvals.resolve(db, req.id, "approved") is True
        await asyncio.sleep(0.3)
        return stopped_after

    stopped_after = asyncio.run(main())
    # No worker thread to stop: the task ends at the cancel.
    assert stopped_after < 0.1, stopped_after
    assert row(migrated_url, req.id)["status"] == "resolved"


# ------------------------------------------------------------------ expiry


def test_overdue_request_is_never_resolved(db, parents, migrated_url):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 0.3)
    time.sleep(0.45)
    # no sweeper has run: the row still says pending
    assert row(migrated_url, req.id)["status"] == "pending"
    assert approvals.resolve(db, req.id, "approved", {"late": True}) is False
    stored = row(migrated_url, req.id)
    assert stored["status"] == "expired"
    assert stored["resolution"] is None and stored["result"] is None
    assert approvals.resolve(db, req.id, "approved") is False
    assert row(migrated_url, req.id)["status"] == "expired"
    with pytest.raises(ApprovalExpired):
        approvals.wait(req.id, 5, url=migrated_url)


def test_overdue_by_raw_deadline_is_never_resolved(db, parents, migrated_url):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 300)
    set_expires(migrated_url, req.id, utcnow() - timedelta(seconds=1))
    for resolution in RESOLUTIONS:
        assert approvals.resolve(db, req.id, resolution) is False
    assert row(migrated_url, req.id)["status"] == "expired"


def test_expire_overdue_returns_exactly_the_overdue(db, parents, migrated_url):
    sid, rid = parents
    past = utcnow() - timedelta(minutes=5)
    overdue = []
    for i in range(3):
        r = approvals.request(db, rid, "plan_approval", {"i": i}, 300)
        set_expires(migrated_url, r.id, past)
        overdue.append(r.id)
    future = [approvals.request(db, rid, "plan_approval", {}, 300).id for _ in range(2)]
    resolved = approvals.request(db, rid, "plan_approval", {}, 300)
    approvals.resolve(db, resolved.id, "approved")
    set_expires(migrated_url, resolved.id, past)
    cancelled = approvals.request(db, rid, "plan_approval", {}, 300)
    approvals.cancel(db, cancelled.id)
    set_expires(migrated_url, cancelled.id, past)

    got = approvals.expire_overdue(db)
    assert sorted(got) == sorted(overdue)
    assert len(got) == len(set(got))
    for i in overdue:
        assert row(migrated_url, i)["status"] == "expired"
    for i in future:
        assert row(migrated_url, i)["status"] == "pending"
    assert row(migrated_url, resolved.id)["status"] == "resolved"
    assert row(migrated_url, cancelled.id)["status"] == "cancelled"
    # idempotent
    assert approvals.expire_overdue(db) == []
    # an explicit `now` in the future expires the still-pending ones
    later = approvals.expire_overdue(db, now=utcnow() + timedelta(hours=1))
    assert sorted(later) == sorted(future)
    assert row(migrated_url, resolved.id)["status"] == "resolved"


def test_pending_lists_only_pending_unexpired_and_filters(db, parents, migrated_url):
    sid, rid = parents
    s2 = Session(name="other")
    db.add(s2)
    db.commit()
    r2 = WorkflowRun(session_id=s2.id)
    db.add(r2)
    db.commit()
    a = approvals.request(db, rid, "plan_approval", {"n": "a"}, 300, session_id=sid)
    time.sleep(0.01)
    b = approvals.request(db, rid, "step_approval", {"n": "b"}, 300)
    time.sleep(0.01)
    c = approvals.request(db, r2.id, "plan_approval", {"n": "c"}, 300, session_id=s2.id)
    overdue = approvals.request(db, rid, "plan_approval", {}, 300, session_id=sid)
    set_expires(migrated_url, overdue.id, utcnow() - timedelta(seconds=1))
    done = approvals.request(db, rid, "plan_approval", {}, 300, session_id=sid)
    approvals.resolve(db, done.id, "approved")
    gone = approvals.request(db, rid, "plan_approval", {}, 300, session_id=sid)
    approvals.cancel(db, gone.id)

    assert [x.id for x in approvals.pending(db)] == [a.id, b.id, c.id]
    assert all(isinstance(x, ApprovalRequest) for x in approvals.pending(db))
    assert [x.id for x in approvals.pending(db, run_id=rid)] == [a.id, b.id]
    assert [x.id for x in approvals.pending(db, run_id=r2.id)] == [c.id]
    assert [x.id for x in approvals.pending(db, session_id=sid)] == [a.id]
    assert [x.id for x in approvals.pending(db, run_id=rid, session_id=s2.id)] == []
    assert [x.id for x in approvals.pending(db, run_id="no-such-run")] == []
    # listing does not expire anything
    assert row(migrated_url, overdue.id)["status"] == "pending"


def test_expire_overdue_on_100k_rows_uses_the_partial_index(db, parents, migrated_url):
    sid, rid = parents
    n, overdue_every = 100_000, 100
    now = utcnow()
    long_ago = now - timedelta(days=2)
    overdue_at = now - timedelta(minutes=1)
    future_at = now + timedelta(days=1)
    conn = raw_connect(migrated_url)
    try:
        cur = conn.cursor()
        t0 = time.perf_counter()
        if is_sqlite(migrated_url):
            cur.execute("BEGIN")
            cur.execute(
                """
                WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x < ?)
                INSERT INTO approval_requests
                    (id, run_id, session_id, approval_type, context, status, resolution,
                     created_at, expires_at, resolved_at)
                SELECT printf('bulk-%06d', x), ?, ?, 'plan_approval', '{}',
                       CASE WHEN x % ? IN (0, 1) THEN 'pending' ELSE 'resolved' END,
                       CASE WHEN x % ? IN (0, 1) THEN NULL ELSE 'approved' END,
                       ?,
                       CASE WHEN x % ? = 0 THEN ? WHEN x % ? = 1 THEN ? ELSE ? END,
                       CASE WHEN x % ? IN (0, 1) THEN NULL ELSE ? END
                FROM c
                """,
                (
                    n - 1, rid, sid, overdue_every, overdue_every, db_ts(migrated_url, long_ago),
                    overdue_every, db_ts(migrated_url, overdue_at), overdue_every,
                    db_ts(migrated_url, future_at), db_ts(migrated_url, long_ago),
                    overdue_every, db_ts(migrated_url, long_ago),
                ),
            )
            cur.execute("COMMIT")
        else:
            cur.execute(
                """
                INSERT INTO approval_requests
                    (id, run_id, session_id, approval_type, context, status, resolution,
                     created_at, expires_at, resolved_at)
                SELECT 'bulk-' || lpad(x::text, 6, '0'), %(rid)s, %(sid)s, 'plan_approval', '{}',
                       CASE WHEN x %% %(m)s IN (0, 1) THEN 'pending' ELSE 'resolved' END,
                       CASE WHEN x %% %(m)s IN (0, 1) THEN NULL ELSE 'approved' END,
                       %(old)s,
                       CASE WHEN x %% %(m)s = 0 THEN %(due)s
                            WHEN x %% %(m)s = 1 THEN %(fut)s ELSE %(old)s END,
                       CASE WHEN x %% %(m)s IN (0, 1) THEN NULL ELSE %(old)s END
                FROM generate_series(0, %(last)s) AS x
                """,
                {
                    "rid": rid, "sid": sid, "m": overdue_every, "old": long_ago,
                    "due": overdue_at, "fut": future_at, "last": n - 1,
                },
            )
            cur.execute("ANALYZE approval_requests")
        insert_s = time.perf_counter() - t0
        cur.close()
    finally:
        conn.close()
    assert row_count(migrated_url, "approval_requests") == n
    expected = sorted(f"bulk-{x:06d}" for x in range(0, n, overdue_every))
    assert len(expected) == 1_000

    t0 = time.perf_counter()
    got = approvals.expire_overdue(db)
    sweep_s = time.perf_counter() - t0
    assert sorted(got) == expected
    counts = dict(
        fetch_all(migrated_url, "SELECT status, COUNT(*) FROM approval_requests GROUP BY status")
    )
    assert counts == {"expired": 1_000, "pending": 1_000, "resolved": 98_000}
    t0 = time.perf_counter()
    assert approvals.expire_overdue(db) == []
    empty_s = time.perf_counter() - t0

    # the sweep reads the partial pending-expiry index
    if is_sqlite(migrated_url):
        plan = fetch_all(
            migrated_url,
            "EXPLAIN QUERY PLAN UPDATE approval_requests SET status = 'expired' "
            "WHERE status = 'pending' AND expires_at < ? RETURNING id",
            (db_ts(migrated_url, utcnow()),),
        )
        detail = " | ".join(str(r[-1]) for r in plan)
        assert "idx_approval_expires" in detail, detail
    else:
        defs = fetch_all(
            migrated_url,
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'approval_requests' "
            "AND indexname = 'idx_approval_expires'",
        )
        assert len(defs) == 1, defs
        indexdef = defs[0][0]
        assert "expires_at" in indexdef and "WHERE" in indexdef and "pending" in indexdef
        plan = fetch_all(
            migrated_url,
            "EXPLAIN SELECT id FROM approval_requests WHERE status = 'pending' "
            "AND expires_at < now()",
        )
        detail = " | ".join(r[0] for r in plan)
    backend = "sqlite" if is_sqlite(migrated_url) else "postgresql"
    print(
        f"\nexpire_overdue [{backend}] on {n} rows (1000 overdue): {sweep_s * 1000:.1f} ms; "
        f"again with none overdue: {empty_s * 1000:.1f} ms; bulk insert {insert_s:.2f} s; "
        f"plan: {detail}"
    )


# ------------------------------------------------------------------ bad input


def insert_overdue(url: str, rid: str, sid: str, n: int, prefix: str = "due") -> list:
    """n pending requests written behind the package's back, the i-th overdue by 2 days
    minus i ms; returns their ids, earliest deadline first."""
    first = utcnow() - timedelta(days=2)
    conn = raw_connect(url)
    try:
        cur = conn.cursor()
        if is_sqlite(url):
            cur.execute("BEGIN")
            cur.execute(
                """
                WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x < ?)
                INSERT INTO approval_requests
                    (id, run_id, session_id, approval_type, context, status, created_at,
                     expires_at)
                SELECT printf('%s-%07d', ?, x), ?, ?, 'plan_approval', '{}', 'pending', ?,
                       strftime('%Y-%m-%d %H:%M:%f', ?, '+' || (x / 1000.0) || ' seconds')
                FROM c
                """,
                (n - 1, prefix, rid, sid, db_ts(url, first), db_ts(url, first)),
            )
            cur.execute("COMMIT")
        else:
            cur.execute(
                """
                INSERT INTO approval_requests
                    (id, run_id, session_id, approval_type, context, status, created_at,
                     expires_at)
                SELECT %(p)s || '-' || lpad(x::text, 7, '0'), %(rid)s, %(sid)s,
                       'plan_approval', '{}', 'pending', %(t)s, %(t)s + x * interval '1 millisecond'
                FROM generate_series(0, %(last)s) AS x
                """,
                {"p": prefix, "rid": rid, "sid": sid, "t": first, "last": n - 1},
            )
            cur.execute("ANALYZE approval_requests")
            conn.commit()
        cur.close()
    finally:
        conn.close()
    return [f"{prefix}-{x:07d}" for x in range(n)]


def status_counts(url: str) -> dict:
    return dict(fetch_all(url, "SELECT status, COUNT(*) FROM approval_requests GROUP BY status"))


def test_a_sweep_commits_each_batch_earliest_deadlines_first(db, parents, migrated_url):
    sid, rid = parents
    due = insert_overdue(migrated_url, rid, sid, 12)
    future = approvals.request(db, rid, "plan_approval", {}, 300)
    sweep = approvals.expire_overdue_batches(db, batch_size=5)
    first = next(sweep)
    assert sorted(first) == due[:5]
    # committed before it was handed out: another connection sees exactly that batch
    assert status_counts(migrated_url) == {"expired": 5, "pending": 8}
    del sweep  # a sweep stopped early leaves the rest for the next one
    assert status_counts(migrated_url) == {"expired": 5, "pending": 8}
    batches = list(approvals.expire_overdue_batches(db, batch_size=5))
    assert [sorted(b) for b in batches] == [due[5:10], due[10:]]
    assert status_counts(migrated_url) == {"expired": 12, "pending": 1}
    assert row(migrated_url, future.id)["status"] == "pending"
    assert list(approvals.expire_overdue_batches(db)) == []
    # a request tracked by the session sees its new status without a refresh
    tracked = db.query(ApprovalRequest).filter(ApprovalRequest.id == future.id).one()
    assert approvals.expire_overdue(db, now=utcnow() + timedelta(hours=1), batch_size=1) == [
        future.id
    ]
    assert tracked.status == "expired"


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-1, OverflowError), ("5", TypeError)])
def test_a_sweep_refuses_a_batch_size_that_is_not_a_positive_count(db, parents, bad, exc):
    with pytest.raises(exc):
        approvals.expire_overdue(db, batch_size=bad)


def test_a_sweep_fixes_now_when_it_starts(db, parents, migrated_url):
    sid, rid = parents
    insert_overdue(migrated_url, rid, sid, 4)
    sweep = approvals.expire_overdue_batches(db, batch_size=2)
    assert len(next(sweep)) == 2
    late = approvals.request(db, rid, "plan_approval", {}, 300)
    set_expires(migrated_url, late.id, utcnow())  # after the sweep started, already past
    time.sleep(0.01)
    assert len(next(sweep)) == 2
    assert list(sweep) == []
    assert row(migrated_url, late.id)["status"] == "pending"
    assert approvals.expire_overdue(db) == [late.id]


def _sweeper(url, out_q):
    db = get_db_session(url)
    try:
        out_q.put(approvals.expire_overdue(db, batch_size=500))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out_q.put(repr(e))
    finally:
        db.close()


def test_concurrent_sweepers_expire_each_request_once(db, parents, migrated_url):
    sid, rid = parents
    due = insert_overdue(migrated_url, rid, sid, 6_000)
    out_q = CTX.Queue()
    procs = [CTX.Process(target=_sweeper, args=(migrated_url, out_q)) for _ in range(3)]
    results = one_result_each(procs, out_q, "a sweeper's ids")
    assert all(isinstance(r, list) for r in results), results
    swept = [i for r in results for i in r]
    assert sorted(swept) == due  # every one expired, by exactly one sweeper
    assert status_counts(migrated_url) == {"expired": 6_000}


def test_a_long_sqlite_sweep_leaves_other_writers_room(sqlite_url):
    """300,000 overdue rows take over a second to expire; a writer whose busy timeout is
    one second creates and resolves requests all the while without 'database is locked'."""
    init_database(sqlite_url)
    setup = get_db_session(sqlite_url)
    s = Session(name="sweep")
    setup.add(s)
    setup.commit()
    r = WorkflowRun(session_id=s.id)
    setup.add(r)
    setup.commit()
    n = 300_000
    insert_overdue(sqlite_url, r.id, s.id, n)
    stop, errors, durations = threading.Event(), [], []

    def writer():
        w = get_db_session(sqlite_url + "?timeout=1")
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                req = approvals.request(w, r.id, "plan_approval", {}, 300)
                assert approvals.resolve(w, req.id, "approved")
            except Exception as e:  # noqa: BLE001 - collected for the assertion
                errors.append(repr(e))
                w.rollback()
            durations.append(time.perf_counter() - t0)
            time.sleep(0.01)
        w.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.1)
        t0 = time.perf_counter()
        swept = sum(len(b) for b in approvals.expire_overdue_batches(setup))
        sweep_s = time.perf_counter() - t0
    finally:
        stop.set()
        t.join()
        setup.close()
    assert swept == n
    assert errors == []
    assert len(durations) > 10
    print(
        f"\nsweep of {n} overdue rows: {sweep_s:.2f} s in batches of {approvals.SWEEP_BATCH}; "
        f"concurrent writer: {len(durations)} request+resolve, longest "
        f"{max(durations) * 1000:.0f} ms"
    )


def test_unknown_ids(db, migrated_url):
    missing = str(uuid.uuid4())
    for call in (
        lambda: approvals.resolve(db, missing, "approved"),
        lambda: approvals.cancel(db, missing),
    ):
        with pytest.raises(ApprovalNotFound) as info:
            call()
        assert isinstance(info.value, LookupError)
        assert isinstance(info.value, ApprovalError)
    t0 = time.monotonic()
    with pytest.raises(ApprovalNotFound):
        approvals.wait(missing, 10, url=migrated_url)
    assert time.monotonic() - t0 < 1.0
    assert row_count(migrated_url, "approval_requests") == 0
    # the session still works
    assert approvals.pending(db) == []


@pytest.mark.parametrize("bad", ["maybe", "APPROVED", "", "pending", "resolved", "expired"])
def test_unknown_resolution_is_refused(db, parents, migrated_url, bad):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    with pytest.raises(ValueError):
        approvals.resolve(db, req.id, bad, {"x": 1})
    stored = row(migrated_url, req.id)
    assert (stored["status"], stored["resolution"], stored["result"]) == ("pending", None, None)
    db.rollback()
    assert approvals.resolve(db, req.id, "approved") is True


@pytest.mark.parametrize(
    "bad, exc",
    [({1, 2}, TypeError), (float("nan"), ValueError), ({"a": float("inf")}, ValueError),
     (object(), TypeError), ({"k": b"bytes"}, TypeError)],
    ids=["set", "nan", "inf-in-dict", "object", "bytes"],
)
def test_non_json_result_is_refused(db, parents, migrated_url, bad, exc):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    with pytest.raises(exc):
        approvals.resolve(db, req.id, "approved", bad)
    stored = row(migrated_url, req.id)
    assert (stored["status"], stored["resolution"], stored["result"]) == ("pending", None, None)
    db.rollback()
    assert approvals.resolve(db, req.id, "approved", {"ok": True}) is True


@pytest.mark.parametrize("bad", ["unknown-resolution", "non-json-result"])
def test_refused_input_leaves_the_session_usable(db, parents, migrated_url, bad):
    """A value refused before anything is sent (like a non-JSON result) should not cost
    the caller its session: no rollback needed, uncommitted work kept."""
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    staged = Session(name="staged-before-bad-call")
    db.add(staged)
    with pytest.raises((ValueError, TypeError)):
        if bad == "unknown-resolution":
            approvals.resolve(db, req.id, "maybe")
        else:
            approvals.resolve(db, req.id, "approved", {1, 2})
    # no rollback: the session goes on, and the staged row is committed by the next call
    assert approvals.resolve(db, req.id, "approved") is True
    assert fetch_all(migrated_url, "SELECT name FROM sessions WHERE id = ?", (staged.id,)) == [
        ("staged-before-bad-call",)
    ]


@pytest.mark.parametrize("bad", [-1, -0.001, float("nan"), float("-inf")])
def test_bad_wait_timeout(db, parents, migrated_url, bad):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    with pytest.raises(ValueError):
        approvals.wait(req.id, bad, url=migrated_url)
    assert row(migrated_url, req.id)["status"] == "pending"


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf")])
def test_bad_request_timeout(db, parents, migrated_url, bad):
    _, rid = parents
    with pytest.raises(ValueError):
        approvals.request(db, rid, "plan_approval", {}, bad)
    db.rollback()
    assert row_count(migrated_url, "approval_requests") == 0


def test_cancel_then_wait_raises_cancelled_at_once(db, parents, migrated_url):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    assert approvals.cancel(db, req.id) is True
    t0 = time.monotonic()
    with pytest.raises(ApprovalCancelled):
        approvals.wait(req.id, None, url=migrated_url)
    assert time.monotonic() - t0 < 1.0
    assert row(migrated_url, req.id)["status"] == "cancelled"


@pytest.mark.parametrize("how", ["marked-expired", "past-deadline"])
def test_wait_on_expired_raises_at_once(db, parents, migrated_url, how):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    set_expires(migrated_url, req.id, utcnow() - timedelta(seconds=5))
    if how == "marked-expired":
        assert approvals.expire_overdue(db) == [req.id]
    else:
        assert row(migrated_url, req.id)["status"] == "pending"
    t0 = time.monotonic()
    with pytest.raises(ApprovalExpired):
        approvals.wait(req.id, None, url=migrated_url)
    assert time.monotonic() - t0 < 1.0
    assert row(migrated_url, req.id)["status"] == "expired"


@pytest.mark.parametrize("huge", [1e19, 1e20, 1e300])
def test_a_timeout_beyond_any_clock_means_no_deadline(db, parents, migrated_url, huge):
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    assert approvals.resolve(db, req.id, "approved") is True
    assert approvals.wait(req.id, huge, url=migrated_url).resolution == "approved"


@pytest.mark.parametrize("huge", [2.6e11, 1e15, 1e300])
def test_a_deadline_after_year_9999_is_refused(db, parents, migrated_url, huge):
    _, rid = parents
    with pytest.raises(ValueError, match="year 10000"):
        ApprovalRequest.create_pending(rid, "plan_approval", {}, timeout_seconds=huge)
    with pytest.raises(ValueError, match="year 10000"):
        approvals.request(db, rid, "plan_approval", {}, huge)
    db.rollback()
    assert row_count(migrated_url, "approval_requests") == 0


@pytest.mark.parametrize("status", [None, "weird", "APPROVED"])
def test_a_status_outside_the_states_ends_the_wait(db, parents, migrated_url, status):
    """Written by another client behind the package's back, with the deadline passed: the
    waiter reports it at once (it used to re-read it forever at full speed)."""
    _, rid = parents
    req = approvals.request(db, rid, "plan_approval", {}, 60)
    fetch_all(migrated_url, "UPDATE approval_requests SET status = ?, expires_at = ? WHERE id = ?",
              (status, db_ts(migrated_url, utcnow() - timedelta(seconds=5)), req.id))
    started = time.monotonic()
    with pytest.raises(DataError, match="not one of the states") as info:
        approvals.wait(req.id, None, url=migrated_url)
    assert time.monotonic() - started < 5
    assert (repr(status) if status else "NULL") in str(info.value).replace('"', "'")
    assert row(migrated_url, req.id)["status"] == status

"""Waiting and presence at scale, on one database; each case prints one JSON line:

    .venv/bin/python bench/waiters.py async   URL 10000    # N wait_async in one event loop
    .venv/bin/python bench/waiters.py threads URL 1000     # N wait() threads
    .venv/bin/python bench/waiters.py last    URL          # the last of 64, resolved alone
    .venv/bin/python bench/waiters.py procs   URL 2500 4   # 4 processes x N wait_async
    .venv/bin/python bench/waiters.py poll    URL 10000    # anchor: N waiters polling every 2 s
    .venv/bin/python bench/waiters.py hb      URL 10000    # heartbeat_many vs N heartbeat()

``async``: the waiting process's CPU while nothing happens (all its threads, as a share of
one core), then every request resolved back to back by another process, and each waiter's
wake-up after its resolve's commit (wall clocks of two processes of one machine).
``threads``: idle CPU and, on PostgreSQL, the server connections the waiting process holds.
``procs``: the same as ``async`` with the waiters spread over several processes and the
resolves made by one more. ``poll``: the design the waiting replaced as an anchor: each
waiter re-reads its request every 2 s (one raw-driver connection per process, as an asyncio
task per waiter), measured the same way as ``async``.
URL is a database cmbagent_db may migrate (a new SQLite file, or a new PostgreSQL database).
bench/run.py runs these and puts them in BENCHMARKS.md.
"""
import asyncio
import json
import multiprocessing as mp
import sys
import threading
import time

import cmbagent_db
from cmbagent_db import approvals, connections, get_db_session
from cmbagent_db.models import ApprovalRequest, Session, WorkflowRun

IDLE_SECONDS = 5.0
POLL_SECONDS = 2.0


def setup(url, n):
    """n pending requests (one transaction), their ids."""
    cmbagent_db.init_database(url)
    db = get_db_session(url)
    s = Session(name="probe")
    db.add(s)
    db.commit()
    r = WorkflowRun(session_id=s.id)
    db.add(r)
    db.commit()
    reqs = [ApprovalRequest.create_pending(run_id=r.id, approval_type="plan_approval",
                                           context={"i": i}, timeout_seconds=3600)
            for i in range(n)]
    db.add_all(reqs)
    db.commit()
    ids = [q.id for q in reqs]
    db.close()
    return ids


def resolver(url, ids, inbox, outbox):
    """Another process: once told, resolves every id back to back; when each committed."""
    db = get_db_session(url)
    approvals.pending(db, run_id="none")  # connected and warm
    outbox.put("ready")
    inbox.get()
    out = {}
    for i in ids:
        approvals.resolve(db, i, "approved")
        out[i] = time.time()
    db.close()
    outbox.put(out)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def lag_summary(woke, resolved):
    lags = [(woke[i] - resolved[i]) * 1e3 for i in resolved if i in woke]
    return {"woken": len(lags), "p50_ms": round(pct(lags, 50), 2),
            "p99_ms": round(pct(lags, 99), 2), "max_ms": round(max(lags), 2)}


class Resolver:
    """The resolving process. Two queues, so that no side reads back its own message."""

    def __init__(self, url, ids):
        ctx = mp.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=resolver, args=(url, ids, self.inbox, self.outbox))
        self.process.start()
        assert self.outbox.get(timeout=120) == "ready"

    def go(self):
        self.inbox.put("go")

    def resolved(self):
        """When each id's resolve committed (after go)."""
        out = self.outbox.get(timeout=600)
        self.process.join()
        return out


async def idle_share():
    """The share of one core this process used over IDLE_SECONDS of nothing happening."""
    c0, w0 = time.process_time(), time.monotonic()
    await asyncio.sleep(IDLE_SECONDS)
    return (time.process_time() - c0) / (time.monotonic() - w0)


def wait_all(url, ids, woke):
    """A task per id awaiting wait_async (in the running loop); each wake-up into woke."""
    async def one(i):
        await approvals.wait_async(i, 600, url=url)
        woke[i] = time.time()

    return [asyncio.create_task(one(i)) for i in ids]


def resolved_back_to_back(url, ids, make_tasks):
    """make_tasks(woke) starts the waiters; once they have waited a while, idle CPU, then
    another process resolves every id: the wake-ups after each commit."""
    r = Resolver(url, ids)
    woke = {}

    async def main():
        tasks = make_tasks(woke)
        await asyncio.sleep(3)  # all registered and read
        idle = await idle_share()
        r.go()
        await asyncio.gather(*tasks)
        return idle

    idle = asyncio.run(main())
    resolved = r.resolved()
    return dict(lag_summary(woke, resolved), n=len(ids), idle_cpu_pct=round(idle * 100, 2))


def run_async(url, ids):
    return resolved_back_to_back(url, ids, lambda woke: wait_all(url, ids, woke))


def poll_anchor(url, ids):
    """Each waiter re-reads its row every POLL_SECONDS through one raw-driver connection."""
    if url.startswith("postgresql"):
        import psycopg2

        conn = psycopg2.connect(url)
        conn.autocommit = True
        sql = "SELECT status FROM approval_requests WHERE id = %s"
    else:
        import sqlite3

        conn = sqlite3.connect(url.split("sqlite:///", 1)[1], isolation_level=None)
        sql = "SELECT status FROM approval_requests WHERE id = ?"
    cur = conn.cursor()

    async def one(i, offset, woke):
        await asyncio.sleep(offset)  # spread over the interval, as waiters arrive
        while True:
            cur.execute(sql, (i,))
            if cur.fetchone()[0] != "pending":
                woke[i] = time.time()
                return
            await asyncio.sleep(POLL_SECONDS)

    def pollers(woke):
        return [asyncio.create_task(one(i, k * POLL_SECONDS / len(ids), woke))
                for k, i in enumerate(ids)]

    try:
        return resolved_back_to_back(url, ids, pollers)
    finally:
        conn.close()


def server_connections(url):
    import psycopg2

    c = psycopg2.connect(url)
    cur = c.cursor()
    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()")
    n = cur.fetchone()[0]
    c.close()
    return n


def run_threads(url, ids):
    out = []
    ts = [threading.Thread(target=lambda i=i: out.append(approvals.wait(i, 600, url=url)))
          for i in ids]
    for t in ts:
        t.start()
    time.sleep(3)
    c0, w0 = time.process_time(), time.monotonic()
    time.sleep(IDLE_SECONDS)
    idle = (time.process_time() - c0) / (time.monotonic() - w0)
    conns = server_connections(url) if url.startswith("postgresql") else None
    db = get_db_session(url)
    for i in ids:
        approvals.resolve(db, i, "approved")
    db.close()
    for t in ts:
        t.join()
    return {"n": len(ids), "idle_cpu_pct": round(idle * 100, 2), "server_connections": conns,
            "woken": len(out)}


def last_of_64(url, ids):
    woke = {}

    async def main():
        tasks = wait_all(url, ids, woke)
        await asyncio.sleep(1)
        lags = []
        for i in ids[-5:]:
            at = time.time()
            await asyncio.to_thread(resolve_one, url, i)
            await asyncio.sleep(0.3)
            lags.append((woke[i] - at) * 1e3)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return lags

    lags = asyncio.run(main())
    return {"lags_ms": [round(x, 2) for x in lags], "max_ms": round(max(lags), 2)}


def resolve_one(url, i):
    db = get_db_session(url)
    approvals.resolve(db, i, "approved")
    db.close()


def waiter_process(url, ids, q):
    woke = {}

    async def main():
        tasks = wait_all(url, ids, woke)
        await asyncio.sleep(3)
        q.put(("ready", None))
        await asyncio.gather(*tasks)

    asyncio.run(main())
    q.put(("woke", woke))


def run_processes(url, ids, procs):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    shares = [ids[k::procs] for k in range(procs)]
    ps = [ctx.Process(target=waiter_process, args=(url, share, q)) for share in shares]
    for p in ps:
        p.start()
    for _ in ps:
        assert q.get(timeout=300)[0] == "ready"
    r = Resolver(url, ids)
    r.go()
    resolved = r.resolved()
    woke = {}
    for _ in ps:
        kind, got = q.get(timeout=600)
        assert kind == "woke"
        woke.update(got)
    for p in ps:
        p.join()
    return dict(lag_summary(woke, resolved), n=len(ids), processes=procs)


def heartbeats(url, n):
    cmbagent_db.init_database(url)
    db = get_db_session(url)
    tasks = [f"task-{k}" for k in range(n)]
    connections.heartbeat_many(db, tasks, server_instance="w")
    t = time.perf_counter()
    connections.heartbeat_many(db, tasks, server_instance="w")
    many = time.perf_counter() - t
    t = time.perf_counter()
    for k in tasks:
        connections.heartbeat(db, k, server_instance="w")
    single = time.perf_counter() - t
    db.close()
    return {"n": n, "many_s": round(many, 4), "single_s": round(single, 3),
            "ratio": round(single / many, 1)}


def main(argv):
    kind, url = argv[0], argv[1]
    n = int(argv[2]) if len(argv) > 2 else 64
    if kind == "async":
        out = run_async(url, setup(url, n))
    elif kind == "threads":
        out = run_threads(url, setup(url, n))
    elif kind == "last":
        out = last_of_64(url, setup(url, 64))
    elif kind == "procs":
        procs = int(argv[3]) if len(argv) > 3 else 4
        out = run_processes(url, setup(url, n * procs), procs)
    elif kind == "poll":
        out = poll_anchor(url, setup(url, n))
    elif kind == "hb":
        out = heartbeats(url, n)
    else:
        sys.exit(f"unknown case {kind!r}")
    print(json.dumps(dict(out, case=kind)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Waiting and presence at scale, on one database, printed as JSON lines:

    .venv/bin/python bench/waiters.py async   URL 10000   # N wait_async in one event loop
    .venv/bin/python bench/waiters.py threads URL 1000    # N wait() threads
    .venv/bin/python bench/waiters.py last    URL         # the last of 64, resolved alone
    .venv/bin/python bench/waiters.py hb      URL 10000   # heartbeat_many vs N heartbeat()

``async``: the waiting process's CPU while nothing happens (all threads, as a share of one
core), then every request resolved back to back by another process, and each waiter's
wake-up after its resolve's commit (wall clocks of the two processes of one machine).
``threads``: idle CPU and, on PostgreSQL, the server connections the waiting process holds.
URL is a database cmbagent_db may migrate (a new SQLite file, or a new PostgreSQL database).
"""
import asyncio
import json
import multiprocessing as mp
import sys
import threading
import time
import cmbagent_db
from cmbagent_db import approvals, connections, get_db_session
from cmbagent_db.models import Session, WorkflowRun

def setup(url, n):
    cmbagent_db.init_database(url)
    db = get_db_session(url)
    s = Session(name="probe"); db.add(s); db.commit()
    r = WorkflowRun(session_id=s.id); db.add(r); db.commit()
    ids = [approvals.request(db, r.id, "plan_approval", {"i": i}, 3600).id for i in range(n)]
    db.close()
    return ids

def resolver(url, ids, q):
    db = get_db_session(url)
    approvals.pending(db, run_id="none")
    q.put("ready")
    q.get()
    out = {}
    for i in ids:
        approvals.resolve(db, i, "approved")
        out[i] = time.time()
    q.put(out)

def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]

def run_async(url, ids, label):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=resolver, args=(url, ids, q)); p.start()
    assert q.get(timeout=60) == "ready"
    woke = {}
    async def one(i):
        await approvals.wait_async(i, 600, url=url)
        woke[i] = time.time()
    async def main():
        tasks = [asyncio.create_task(one(i)) for i in ids]
        await asyncio.sleep(3)  # all registered and read
        c0, w0 = time.process_time(), time.monotonic()
        await asyncio.sleep(5)
        idle = (time.process_time() - c0) / (time.monotonic() - w0)
        q.put("go")
        await asyncio.gather(*tasks)
        return idle
    idle = asyncio.run(main())
    resolved = q.get(timeout=600)
    p.join()
    lags = [(woke[i] - resolved[i]) * 1e3 for i in ids]
    print(json.dumps({"case": label, "n": len(ids), "idle_cpu_pct": round(idle * 100, 2),
                      "p50_ms": round(pct(lags, 50), 2), "p99_ms": round(pct(lags, 99), 2),
                      "max_ms": round(max(lags), 2)}), flush=True)

def run_threads(url, ids, label):
    out = []
    ts = [threading.Thread(target=lambda i=i: out.append(approvals.wait(i, 600, url=url))) for i in ids]
    for t in ts: t.start()
    time.sleep(3)
    c0, w0 = time.process_time(), time.monotonic()
    time.sleep(5)
    idle = (time.process_time() - c0) / (time.monotonic() - w0)
    conns = None
    if url.startswith("postgresql"):
        import psycopg2
        c = psycopg2.connect(url); cur = c.cursor()
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        conns = cur.fetchone()[0]; c.close()
    db = get_db_session(url)
    for i in ids: approvals.resolve(db, i, "approved")
    db.close()
    for t in ts: t.join()
    print(json.dumps({"case": label, "n": len(ids), "idle_cpu_pct": round(idle * 100, 2),
                      "server_connections": conns, "woken": len(out)}), flush=True)

def last_of_64(url, ids, label):
    woke = {}
    async def one(i):
        await approvals.wait_async(i, 600, url=url); woke[i] = time.time()
    async def main():
        tasks = [asyncio.create_task(one(i)) for i in ids]
        await asyncio.sleep(1)
        lags = []
        for i in ids[-5:]:
            at = time.time()
            await asyncio.to_thread(resolve_one, url, i)
            await asyncio.sleep(0.3)
            lags.append((woke[i] - at) * 1e3)
        for t in tasks: t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return lags
    lags = asyncio.run(main())
    print(json.dumps({"case": label, "lags_ms": [round(x, 2) for x in lags]}), flush=True)

def resolve_one(url, i):
    db = get_db_session(url); approvals.resolve(db, i, "approved"); db.close()

def heartbeats(url, n, label):
    cmbagent_db.init_database(url)
    db = get_db_session(url)
    tasks = [f"task-{k}" for k in range(n)]
    connections.heartbeat_many(db, tasks, server_instance="w")
    t = time.perf_counter(); connections.heartbeat_many(db, tasks, server_instance="w"); many = time.perf_counter() - t
    t = time.perf_counter()
    for k in tasks: connections.heartbeat(db, k, server_instance="w")
    single = time.perf_counter() - t
    db.close()
    print(json.dumps({"case": label, "n": n, "many_s": round(many, 4), "single_s": round(single, 3),
                      "ratio": round(single / many, 1)}), flush=True)

if __name__ == "__main__":
    kind, url = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3])
    if kind == "async": run_async(url, setup(url, n), f"wait_async x{n}")
    if kind == "threads": run_threads(url, setup(url, n), f"wait threads x{n}")
    if kind == "last": last_of_64(url, setup(url, 64), "last of 64")
    if kind == "hb": heartbeats(url, n, f"heartbeat_many x{n}")

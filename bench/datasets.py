"""The benchmark databases: migrated by ``cmbagent_db.init_database``, filled fast through
the raw drivers, then copied so that every system reads the same data and every system
that writes gets its own fresh copy.

Kinds:
    base        10 sessions, 100 workflow runs, 200 active connections, no approvals
    big:<n>     base plus <n> approvals, of which 1,000 pending and overdue, 1,000 pending
                and not yet due, the rest resolved / expired / cancelled, in random order
    rel         base plus more runs, 1,000 workflow runs in all, each with the same few
                approvals (3 by default), for the relationship loads

A descriptor (what workers get) is a dict: backend, path (SQLite) or dsn + dbname
(PostgreSQL), run_id and session_id to attach new approvals to.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sqlite3
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from workloads import SERVER_INSTANCE, make_context, sqlite_ts

N_SESSIONS = 10
RUNS_PER_SESSION = 10
N_CONNECTIONS = 200
N_OVERDUE = 1000
N_PENDING_FUTURE = 1000

APPROVAL_TYPES = ("plan_approval", "step_approval", "error_recovery", "tool_call")
RESOLUTIONS = ("approved", "rejected", "modified")


def task_ids() -> List[str]:
    return [f"task-{i:04d}" for i in range(N_CONNECTIONS)]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class Parents:
    """The sessions and runs every database shares (same ids on both backends)."""

    def __init__(self) -> None:
        rng = random.Random(7)
        self.sessions = [_uuid(rng) for _ in range(N_SESSIONS)]
        self.runs = [(_uuid(rng), self.sessions[i // RUNS_PER_SESSION])
                     for i in range(N_SESSIONS * RUNS_PER_SESSION)]
        self.connections = [(_uuid(rng), t, self.sessions[i % N_SESSIONS])
                            for i, t in enumerate(task_ids())]


PARENTS = Parents()


def approval_rows(n: int, now: datetime, seed: int = 42) -> Iterator[Tuple[Any, ...]]:
    """n approvals in column order (id, run_id, session_id, approval_type, context, status,
    resolution, result, created_at, expires_at, resolved_at); datetimes aware UTC."""
    rng = random.Random(seed)
    special = rng.sample(range(n), N_OVERDUE + N_PENDING_FUTURE)
    overdue = set(special[:N_OVERDUE])
    future = set(special[N_OVERDUE:])
    runs = PARENTS.runs
    day = 86400.0
    for i in range(n):
        run_id, session_id = runs[i % len(runs)]
        ctx = json.dumps(make_context(i))
        atype = APPROVAL_TYPES[i % len(APPROVAL_TYPES)]
        resolution = result = resolved_at = None
        if i in overdue:
            created = now - timedelta(seconds=rng.uniform(301.0, 2 * day))
            expires = created + timedelta(seconds=300)
            status = "pending"
        elif i in future:
            created = now - timedelta(seconds=rng.uniform(0.0, 60.0))
            expires = now + timedelta(days=7)
            status = "pending"
        else:
            created = now - timedelta(seconds=rng.uniform(3600.0, 30 * day))
            expires = created + timedelta(seconds=300)
            r = rng.random()
            if r < 0.85:
                status = "resolved"
                resolution = RESOLUTIONS[i % 3]
                result = json.dumps({"feedback": f"looks fine ({i})"})
                resolved_at = created + timedelta(seconds=rng.uniform(1.0, 290.0))
            elif r < 0.95:
                status = "expired"
            else:
                status = "cancelled"
                resolved_at = created + timedelta(seconds=rng.uniform(1.0, 290.0))
        yield (_uuid(rng), run_id, session_id, atype, ctx, status, resolution, result,
               created, expires, resolved_at)


def rel_rows(runs: List[Tuple[str, str]], per_run: int, now: datetime,
             seed: int = 99) -> Iterator[Tuple[Any, ...]]:
    """per_run approvals for each run (same column order as approval_rows), mostly resolved,
    the last of each run pending and not yet due: a run's history of approvals."""
    rng = random.Random(seed)
    k = 0
    for run_id, session_id in runs:
        for j in range(per_run):
            created = now - timedelta(seconds=rng.uniform(3600.0, 30 * 86400.0))
            atype = APPROVAL_TYPES[k % len(APPROVAL_TYPES)]
            ctx = json.dumps(make_context(k))
            if j < per_run - 1:
                yield (_uuid(rng), run_id, session_id, atype, ctx, "resolved",
                       RESOLUTIONS[k % 3], json.dumps({"feedback": f"looks fine ({k})"}),
                       created, created + timedelta(seconds=300),
                       created + timedelta(seconds=rng.uniform(1.0, 290.0)))
            else:
                created = now - timedelta(seconds=rng.uniform(0.0, 60.0))
                yield (_uuid(rng), run_id, session_id, atype, ctx, "pending", None, None,
                       created, now + timedelta(days=7), None)
            k += 1


def _sqlite_row(row: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return tuple(sqlite_ts(v) if isinstance(v, datetime) else v for v in row)


def _copy_text(row: Tuple[Any, ...]) -> str:
    """One line of PostgreSQL's COPY text format (our values hold no tab, newline or \\)."""
    out = []
    for v in row:
        if v is None:
            out.append("\\N")
        elif isinstance(v, datetime):
            out.append(v.isoformat())
        else:
            out.append(str(v))
    return "\t".join(out) + "\n"


class Datasets:
    """Builds and copies the databases of one backend under ``workdir``."""

    def __init__(self, backend: str, workdir: str, server=None,
                 log: Callable[[str], None] = print) -> None:
        self.backend = backend
        self.workdir = workdir
        self.server = server
        self.log = log
        self.masters: Dict[str, Dict[str, Any]] = {}
        self._copies: List[Dict[str, Any]] = []
        self.now = datetime.now(timezone.utc)

    # -- descriptors ---------------------------------------------------------------------
    def _descriptor(self, **kw) -> Dict[str, Any]:
        run_id, session_id = PARENTS.runs[0]
        d = {"backend": self.backend, "run_id": run_id, "session_id": session_id}
        d.update(kw)
        return d

    def cmbagent_url(self, d: Dict[str, Any]) -> str:
        return f"sqlite:///{d['path']}" if self.backend == "sqlite" else d["dsn"]

    # -- building ------------------------------------------------------------------------
    def _raw(self, d: Dict[str, Any]):
        if self.backend == "sqlite":
            c = sqlite3.connect(d["path"])
            # Building only: nothing is timed here, and a crash just means rebuilding.
            c.execute("PRAGMA synchronous=OFF")
            c.execute("PRAGMA foreign_keys=ON")
            c.execute("PRAGMA cache_size=-1000000")
            return c
        import psycopg2

        return psycopg2.connect(d["dsn"])

    def _new_master(self, name: str) -> Dict[str, Any]:
        if self.backend == "sqlite":
            path = os.path.join(self.workdir, f"{name}.db")
            return self._descriptor(path=path, name=name)
        dsn = self.server.create_database(prefix=f"bench_{name}")
        return self._descriptor(dsn=dsn, dbname=self.server.dbname(dsn), name=name)

    def build_base(self) -> Dict[str, Any]:
        import cmbagent_db

        t0 = time.perf_counter()
        d = self._new_master("base")
        cmbagent_db.init_database(self.cmbagent_url(d))
        cmbagent_db.dispose_engines()
        naive = self.now.replace(tzinfo=None)
        stale = self.now - timedelta(days=1)
        if self.backend == "sqlite":
            ts, tsz, ph = sqlite_ts(naive), sqlite_ts(stale), "?"
        else:
            ts, tsz, ph = naive, stale, "%s"
        c = self._raw(d)
        cur = c.cursor()
        cur.executemany(
            f"INSERT INTO sessions (id, name, created_at, last_active_at, status) "
            f"VALUES ({ph}, {ph}, {ph}, {ph}, 'active')",
            [(s, f"bench session {i}", ts, ts) for i, s in enumerate(PARENTS.sessions)],
        )
        cur.executemany(
            "INSERT INTO workflow_runs (id, session_id, mode, agent, model, status, "
            "checkpoint_frequency_minutes, task_description, is_branch, branch_depth) "
            f"VALUES ({ph}, {ph}, 'one_shot', 'engineer', 'gpt-4o', 'executing', 10, {ph}, "
            f"{'0' if self.backend == 'sqlite' else 'false'}, 0)",
            [(r, s, f"benchmark run {i}") for i, (r, s) in enumerate(PARENTS.runs)],
        )
        cur.executemany(
            "INSERT INTO active_connections (id, task_id, session_id, server_instance, "
            f"connected_at, last_heartbeat) VALUES ({ph}, {ph}, {ph}, {ph}, {ph}, {ph})",
            [(i, t, s, SERVER_INSTANCE, tsz, tsz) for i, t, s in PARENTS.connections],
        )
        c.commit()
        self._tidy(c)
        c.close()
        self.masters["base"] = d
        self.log(f"  [{self.backend}] base database ready ({time.perf_counter() - t0:.1f}s)")
        return d

    def _tidy(self, c) -> None:
        """Leave a master as a long-running database would be: WAL checkpointed (SQLite),
        vacuumed and analysed (PostgreSQL, as autovacuum would have done)."""
        if self.backend == "sqlite":
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            c.commit()
            c.autocommit = True
            c.cursor().execute("VACUUM ANALYZE")
            c.cursor().execute("CHECKPOINT")

    def build_big(self, n: int) -> Dict[str, Any]:
        key = f"big:{n}"
        t0 = time.perf_counter()
        d = self.copy("base", master_name=f"big{n}")
        c = self._raw(d)
        cur = c.cursor()
        self._load_approvals(cur, approval_rows(n, self.now))
        c.commit()
        cur.execute("SELECT count(*) FROM approval_requests")
        count = cur.fetchone()[0]
        if count != n:
            raise RuntimeError(f"{key}: {count} rows loaded, expected {n}")
        self._tidy(c)
        c.close()
        self._copies.remove(d)  # a master, not a throwaway copy
        self.masters[key] = d
        self.log(f"  [{self.backend}] {n:,} approvals loaded ({time.perf_counter() - t0:.1f}s)")
        return d

    def build_rel(self, runs: int = 1000, per_run: int = 3) -> Dict[str, Any]:
        """Base plus runs, ``runs`` in all (the base's 100 among them), each with ``per_run``
        approvals: the data of the relationship loads."""
        t0 = time.perf_counter()
        d = self.copy("base", master_name="rel")
        rng = random.Random(11)
        extra = [(_uuid(rng), PARENTS.sessions[i % N_SESSIONS])
                 for i in range(max(0, runs - len(PARENTS.runs)))]
        all_runs = (PARENTS.runs + extra)[:runs]
        c = self._raw(d)
        cur = c.cursor()
        ph = "?" if self.backend == "sqlite" else "%s"
        cur.executemany(
            "INSERT INTO workflow_runs (id, session_id, mode, agent, model, status, "
            "checkpoint_frequency_minutes, task_description, is_branch, branch_depth) "
            f"VALUES ({ph}, {ph}, 'one_shot', 'engineer', 'gpt-4o', 'completed', 10, {ph}, "
            f"{'0' if self.backend == 'sqlite' else 'false'}, 0)",
            [(r, s, f"benchmark run {len(PARENTS.runs) + i}") for i, (r, s) in enumerate(extra)],
        )
        self._load_approvals(cur, rel_rows(all_runs, per_run, self.now))
        c.commit()
        cur.execute("SELECT count(*), count(DISTINCT run_id) FROM approval_requests")
        count, with_children = cur.fetchone()
        cur.execute("SELECT count(*) FROM workflow_runs")
        nruns = cur.fetchone()[0]
        if (nruns, with_children, count) != (runs, runs, runs * per_run):
            raise RuntimeError(f"rel: {nruns} runs, {with_children} with approvals, {count} "
                               f"approvals; expected {runs}, {runs}, {runs * per_run}")
        self._tidy(c)
        c.close()
        self._copies.remove(d)
        self.masters["rel"] = d
        self.log(f"  [{self.backend}] {runs:,} runs with {per_run} approvals each loaded "
                 f"({time.perf_counter() - t0:.1f}s)")
        return d

    def _load_approvals(self, cur, rows: Iterator[Tuple[Any, ...]]) -> None:
        """Inserts approval rows (approval_rows' column order) in chunks, by executemany
        (SQLite) or COPY (PostgreSQL)."""
        chunk = 50_000
        if self.backend == "sqlite":
            sql = ("INSERT INTO approval_requests (id, run_id, session_id, approval_type, "
                   "context, status, resolution, result, created_at, expires_at, resolved_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            while True:
                batch = [_sqlite_row(r) for _, r in zip(range(chunk), rows)]
                if not batch:
                    break
                cur.executemany(sql, batch)
        else:
            cols = ("id", "run_id", "session_id", "approval_type", "context", "status",
                    "resolution", "result", "created_at", "expires_at", "resolved_at")
            while True:
                buf = io.StringIO("".join(_copy_text(r) for _, r in zip(range(chunk), rows)))
                if buf.getvalue() == "":
                    break
                cur.copy_from(buf, "approval_requests", columns=cols)

    # -- copies --------------------------------------------------------------------------
    def copy(self, kind: str, master_name: Optional[str] = None) -> Dict[str, Any]:
        """A fresh copy of master ``kind`` (for a system that writes)."""
        src = self.masters[kind]
        name = master_name or f"copy_{uuid.uuid4().hex[:8]}"
        if self.backend == "sqlite":
            path = os.path.join(self.workdir, f"{name}.db")
            shutil.copyfile(src["path"], path)
            d = self._descriptor(path=path, name=name)
        else:
            dsn = self.server.create_database(prefix=f"bench_{name}", template=src["dbname"])
            d = self._descriptor(dsn=dsn, dbname=self.server.dbname(dsn), name=name)
        self._copies.append(d)
        return d

    def drop(self, d: Dict[str, Any]) -> None:
        if self.backend == "sqlite":
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.remove(d["path"] + suffix)
                except FileNotFoundError:
                    pass
        else:
            self.server.drop_database(d["dbname"])
        if d in self._copies:
            self._copies.remove(d)

    def cleanup(self) -> None:
        for d in list(self._copies) + list(self.masters.values()):
            try:
                self.drop(d)
            except Exception as exc:  # best effort at the end
                self.log(f"  cleanup of {d.get('name')}: {exc}")
        self.masters.clear()

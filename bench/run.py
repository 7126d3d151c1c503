#!/usr/bin/env python
"""Benchmarks of cmbagent_db against SQLAlchemy 2 and the raw drivers.

    .venv/bin/python bench/run.py [--backend sqlite|postgresql|all] [--quick] [--out BENCHMARKS.md]

Measures, on one machine, with the same settings (SQLite: WAL, foreign_keys ON,
synchronous=FULL on every side; PostgreSQL: fsync and synchronous_commit on) and the same
data, eight workloads for three systems:

  cmbagent_db   its public Python API, exactly as cmbagent calls it
  SQLAlchemy    SQLAlchemy 2 ORM with cmbagent's own models (tests/reference_models.py),
                sessionmaker(autoflush=False, expire_on_commit=False)
  raw           sqlite3 / psycopg2 with hand-written SQL: the floor

plus the Rust core without Python (examples/core_bench.rs) for the bulk insert and the
lookup, so the cost of the Python boundary shows as its own number. Each (system,
workload) runs in its own fresh process; every timed workload has a warm-up repetition and
reports the median of the others. Prints the table and writes it, with the machine,
versions, date and command, to --out.

PostgreSQL: CMBAGENT_DB_BENCH_PG_URL (a server whose user may CREATE DATABASE) if set,
else a throwaway durable server (bench/pg_server.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

SYSTEMS = ("cmbagent_db", "sqlalchemy", "raw")
SYSTEM_LABEL = {"cmbagent_db": "cmbagent_db", "sqlalchemy": "SQLAlchemy", "raw": "raw driver",
                "core": "Rust core (no Python)"}

# Per repetition; the driver interleaves the systems' repetitions (see run_interleaved).
FULL = {
    "create_commit": {"n": 50, "reps": 30},
    "heartbeat": {"connections": 200, "reps": 18},
    "bulk_insert": {"rows": 20_000, "reps": 6},
    "lookup": {"n": 2_000, "reps": 12},
    "overdue": {"k": 5, "reps": 12},
    "sweep": {"reps": 12},
    "load_all": {"runs": 6},
    "relationship": {"runs": 1_000, "per_run": 3, "reps": 12},
    "table": 100_000,
    "sweep_sizes": (100_000, 1_000_000),
    "waiters": {"async": 10_000, "threads": 1_000, "procs": [2_500, 4], "poll": 10_000, "hb": 10_000},
}
QUICK = {
    "create_commit": {"n": 50, "reps": 4},
    "heartbeat": {"connections": 200, "reps": 2},
    "bulk_insert": {"rows": 20_000, "reps": 2},
    "lookup": {"n": 1_000, "reps": 4},
    "overdue": {"k": 3, "reps": 4},
    "sweep": {"reps": 3},
    "load_all": {"runs": 1},
    "relationship": {"runs": 1_000, "per_run": 3, "reps": 3},
    "table": 100_000,
    "sweep_sizes": (10_000, 100_000),
    "waiters": {"async": 2_000, "threads": 200, "procs": [500, 4], "poll": 2_000, "hb": 2_000},
}

_T0 = time.monotonic()


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.monotonic() - _T0:6.0f}s] {msg}\n")
    sys.stderr.flush()


def median(xs: List[float]) -> float:
    return statistics.median(xs)


# --------------------------------------------------------------------------------------
# Workers: one process per (system, workload), driven repetition by repetition
# --------------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class Worker:
    """A worker process speaking the protocol of workloads.worker_main (and core_bench --serve)."""

    def __init__(self, cmd: List[str], spec: Optional[Dict[str, Any]] = None) -> None:
        self.errfile = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errfile, text=True, cwd=str(ROOT), bufsize=1)
        self.secs: List[float] = []
        self.result: Dict[str, Any] = {}
        self.error: Optional[str] = None
        if spec is not None:
            self._send(json.dumps(spec))

    @classmethod
    def python(cls, spec: Dict[str, Any]) -> "Worker":
        return cls([sys.executable, str(BENCH / "run.py"), "--worker"], spec)

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _stderr(self) -> str:
        self.errfile.seek(0)
        return self.errfile.read()[-3000:]

    def _read(self, timeout: float = 900) -> str:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise WorkerError(f"no answer within {timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"worker exited ({self.proc.wait()}): {self._stderr()}")
        if line.startswith("ERROR "):
            raise WorkerError(json.loads(line[6:]) + "\n" + self._stderr())
        return line.rstrip("\n")

    def _guard(self, fn) -> None:
        if self.error is not None:
            return
        try:
            fn()
        except (WorkerError, OSError, ValueError) as exc:
            self.error = str(exc)
            self.kill()

    def ready(self) -> None:
        def go():
            line = self._read()
            if line != "READY":
                raise WorkerError(f"expected READY, got {line!r}")
        self._guard(go)

    def rep(self) -> None:
        def go():
            self._send("REP")
            line = self._read()
            if not line.startswith("REP "):
                raise WorkerError(f"expected REP, got {line!r}")
            self.secs.append(float(line[4:]))
        self._guard(go)

    def end(self) -> Dict[str, Any]:
        def go():
            self._send("END")
            line = self._read()
            if not line.startswith("RESULT "):
                raise WorkerError(f"expected RESULT, got {line!r}")
            self.result = json.loads(line[7:])
            self.proc.wait(timeout=60)
        self._guard(go)
        self.errfile.close()
        if self.error is not None:
            return {"error": self.error.splitlines()[0] if self.error else "error",
                    "detail": self.error}
        return dict(self.result, secs=self.secs)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def round_orders(names: List[str], rounds: int) -> List[List[str]]:
    """The order of the systems in each round: every permutation in turn (a seeded shuffle
    beyond four systems), so each system runs first, last and right after each other one
    equally often -- on a shared disk, who wrote just before matters."""
    import itertools
    import random

    if len(names) <= 4:
        perms = [list(p) for p in itertools.permutations(names)]
        return [perms[r % len(perms)] for r in range(rounds)]
    rng = random.Random(2024)
    out = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        out.append(order)
    return out


def run_interleaved(workers: Dict[str, Worker], reps: int, writes: bool = False) -> Dict[str, Dict[str, Any]]:
    """All workers set up and warmed up first; then one timed repetition each per round, in
    orders that vary round by round, so that a drift in the machine's load hits every system
    alike. For workloads that write, dirty pages are flushed (sync) before each repetition,
    so that no system pays for the previous one's writes."""
    for w in workers.values():
        w.ready()
    for order in round_orders(list(workers), reps):
        for name in order:
            if writes:
                os.sync()
            workers[name].rep()
    out = {name: w.end() for name, w in workers.items()}
    for name, res in out.items():
        if "error" in res:
            log(f"    ! {name}: {res['detail'][-2500:]}")
    return out


def has_connections_service() -> bool:
    try:
        import importlib

        importlib.import_module("cmbagent_db.connections")
        return True
    except ImportError:
        return False


def run_backend(backend: str, cfg: Dict[str, Any], work: str, server,
                results: Dict[Tuple[str, str, str], Dict[str, Any]], core: Optional[str]) -> None:
    from datasets import Datasets

    ds = Datasets(backend, work, server, log)

    def record(workload: str, out: Dict[str, Dict[str, Any]]) -> None:
        for system, res in out.items():
            results[(backend, workload, system)] = res
            if "error" in res:
                continue
            extra = f", peak +{res['peak_delta_kb'] / 1024:.0f} MB" if "peak_delta_kb" in res else ""
            log(f"    {SYSTEM_LABEL.get(system, system):22s} {workload:14s} median "
                f"{median(res['secs']) * 1e3:10.2f} ms of {len(res['secs'])}{extra}")

    def spec(system: str, workload: str, dbs, params) -> Dict[str, Any]:
        return {"system": system, "workload": workload, "dbs": dbs, "params": params}

    def core_worker(mode: str, args: List[str]) -> Worker:
        assert core is not None
        return Worker([core, *args, "--serve", mode])

    def arg(d: Dict[str, Any]) -> str:
        return d["path"] if backend == "sqlite" else d["dsn"]

    try:
        log(f"[{backend}] building databases")
        ds.build_base()
        table_n = cfg["table"]
        for n in sorted(set(cfg["sweep_sizes"]) | {table_n}):
            ds.build_big(n)
        rel = cfg.get("relationship")
        if rel:
            ds.build_rel(rel["runs"], rel["per_run"])
        big = ds.masters[f"big:{table_n}"]

        # 1. one approval per transaction: a fresh copy of base per system.
        log(f"[{backend}] 1. create_pending + commit")
        p = cfg["create_commit"]
        copies = {s: ds.copy("base") for s in SYSTEMS}
        record("create_commit", run_interleaved(
            {s: Worker.python(spec(s, "create_commit", [copies[s]], p)) for s in SYSTEMS}, p["reps"],
            writes=True))
        for d in copies.values():
            ds.drop(d)

        # 2. bulk insert: a fresh copy per repetition (and one for the warm-up).
        log(f"[{backend}] 2. bulk insert")
        p = cfg["bulk_insert"]
        names = SYSTEMS + (("core",) if core else ())
        copies2 = {s: [ds.copy("base") for _ in range(p["reps"] + 1)] for s in names}
        workers = {s: Worker.python(spec(s, "bulk_insert", copies2[s], p)) for s in SYSTEMS}
        if core:
            c = copies2["core"]
            workers["core"] = core_worker("insert", [arg(c[0]), "--rows", str(p["rows"]),
                                                     "--run-id", c[0]["run_id"], "--session-id", c[0]["session_id"]]
                                          + [x for d in c for x in ("--insert-db", arg(d))])
        record("bulk_insert", run_interleaved(workers, p["reps"], writes=True))
        for ds_list in copies2.values():
            for d in ds_list:
                ds.drop(d)

        # 3. lookups: read-only, every system on the same master.
        log(f"[{backend}] 3. lookup by id")
        p = cfg["lookup"]
        workers = {s: Worker.python(spec(s, "lookup", [big], p)) for s in SYSTEMS}
        if core:
            workers["core"] = core_worker("lookup", [arg(big), "--lookup-db", arg(big),
                                                     "--lookups", str(p["n"])])
        record("lookup", run_interleaved(workers, p["reps"]))

        # 4. the overdue query.
        log(f"[{backend}] 4. overdue query")
        p = dict(cfg["overdue"], expected=1000)
        record("overdue", run_interleaved(
            {s: Worker.python(spec(s, "overdue", [big], p)) for s in SYSTEMS}, p["reps"]))

        # 5. the sweep, a fresh copy per system, at both sizes.
        for n in cfg["sweep_sizes"]:
            log(f"[{backend}] 5. sweep on {n:,} rows")
            p = dict(cfg["sweep"], expected=1000)
            copies = {s: ds.copy(f"big:{n}") for s in SYSTEMS}
            record(f"sweep:{n}", run_interleaved(
                {s: Worker.python(spec(s, "sweep", [copies[s]], p)) for s in SYSTEMS}, p["reps"],
                writes=True))
            for d in copies.values():
                ds.drop(d)

        # 6. heartbeats: a fresh copy per system; cmbagent_db also through the ORM path
        # when its connections service is what "cmbagent_db" runs.
        log(f"[{backend}] 6. heartbeat")
        p = cfg["heartbeat"]
        names = SYSTEMS + (("cmbagent_db_orm",) if has_connections_service() else ())
        copies = {s: ds.copy("base") for s in names}
        workers = {s: Worker.python(spec(s, "heartbeat", [copies[s]], p)) for s in SYSTEMS}
        if "cmbagent_db_orm" in names:
            workers["cmbagent_db_orm"] = Worker.python(
                spec("cmbagent_db", "heartbeat", [copies["cmbagent_db_orm"]],
                     dict(p, heartbeat_path="orm")))
        out = run_interleaved(workers, p["reps"], writes=True)
        orm = out.pop("cmbagent_db_orm", None)
        record("heartbeat", out)
        if orm is not None:
            results[(backend, "heartbeat_orm", "cmbagent_db")] = orm
            if "secs" in orm:
                log(f"    cmbagent_db (ORM path) heartbeat       median {median(orm['secs']) * 1e3:10.2f} ms")
        for d in copies.values():
            ds.drop(d)

        # 9. SQLAlchemy's ORM with the same models on cmbagent_db's driver vs on sqlite3 /
        # psycopg2: recorded in the cmbagent_db column, so the ratio is the driver's cost.
        for workload, dbs_of in (("create_commit", lambda: ds.copy("base")), ("lookup", lambda: big)):
            log(f"[{backend}] 9. SQLAlchemy on cmbagent_db's driver: {workload}")
            p = cfg[workload]
            dbs = {s: dbs_of() for s in ("cmbagent_db", "sqlalchemy")}
            record(f"bridge:{workload}", run_interleaved(
                {"cmbagent_db": Worker.python(spec("sqlalchemy_bridge", workload, [dbs["cmbagent_db"]], p)),
                 "sqlalchemy": Worker.python(spec("sqlalchemy", workload, [dbs["sqlalchemy"]], p))},
                p["reps"], writes=workload == "create_commit"))
            if workload == "create_commit":
                for d in dbs.values():
                    ds.drop(d)

        # 10. The five models' calls in cmbagent_db.sqlalchemy sessions, against the same
        # calls in cmbagent_db's own sessions (recorded in the raw column): the bridge's cost.
        for workload, dbs_of in (("create_commit", lambda: ds.copy("base")), ("lookup", lambda: big)):
            log(f"[{backend}] 10. the five models in a bridge session: {workload}")
            p = cfg[workload]
            dbs = {s: dbs_of() for s in SYSTEMS}
            record(f"five_in_bridge:{workload}", run_interleaved(
                {"cmbagent_db": Worker.python(spec("cmbagent_db_in_bridge", workload, [dbs["cmbagent_db"]], p)),
                 "sqlalchemy": Worker.python(spec("sqlalchemy", workload, [dbs["sqlalchemy"]], p)),
                 "raw": Worker.python(spec("cmbagent_db", workload, [dbs["raw"]], p))},
                p["reps"], writes=workload == "create_commit"))
            if workload == "create_commit":
                for d in dbs.values():
                    ds.drop(d)

        # 11. Rows 1 and 3 over TLS (sslmode=require) for every system: what TLS costs
        # this package against what it costs psycopg2. Needs a server with ssl on (the
        # throwaway one has it).
        if backend == "postgresql" and server is not None and server.cluster is not None:
            def over_tls(d: Dict[str, Any]) -> Dict[str, Any]:
                return dict(d, dsn=d["dsn"] + ("&" if "?" in d["dsn"] else "?") + "sslmode=require")

            for workload, dbs_of in (("create_commit", lambda: ds.copy("base")), ("lookup", lambda: big)):
                log(f"[{backend}] 11. over TLS (sslmode=require): {workload}")
                p = cfg[workload]
                dbs = {s: dbs_of() for s in SYSTEMS}
                record(f"tls:{workload}", run_interleaved(
                    {s: Worker.python(spec(s, workload, [over_tls(dbs[s])], p)) for s in SYSTEMS},
                    p["reps"], writes=workload == "create_commit"))
                if workload == "create_commit":
                    for d in dbs.values():
                        ds.drop(d)

        # 7. .all(): a fresh process per measurement, systems in varying order.
        log(f"[{backend}] 7. load all")
        runs: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SYSTEMS}
        for order in round_orders(list(SYSTEMS), cfg["load_all"]["runs"]):
            for s in order:
                w = Worker.python(spec(s, "load_all", [big], {"expected": table_n}))
                w.ready()
                w.rep()
                runs[s].append(w.end())
        out = {}
        for s, rs in runs.items():
            bad = [r for r in rs if "error" in r]
            if bad:
                log(f"    ! {s}: {bad[0]['detail'][-2500:]}")
                out[s] = bad[0]
                continue
            out[s] = {
                "secs": [r["secs"][0] for r in rs],
                "peak_delta_kb": median([r["peak_delta_kb"] for r in rs]),
                "peak_deltas_kb": [r["peak_delta_kb"] for r in rs],
                "retained_kb": median([r["retained_kb"] for r in rs]),
                "hwm_reset": all(r.get("hwm_reset") for r in rs),
            }
        record("load_all", out)

        # 8. relationship loads over the runs: lazy (N+1) and selectinload; read-only,
        # every system on the same master, one process per system and mode.
        if rel:
            for mode in ("lazy", "selectin", "join"):
                log(f"[{backend}] 8. relationship load, {mode}")
                p = dict(rel, mode=mode)
                record(f"rel:{mode}", run_interleaved(
                    {s: Worker.python(spec(s, "relationship", [ds.masters["rel"]], p))
                     for s in SYSTEMS}, p["reps"]))
    finally:
        ds.cleanup()


WAITER_CASES = ("async", "poll", "threads", "last", "procs", "hb")


def run_waiters(backend: str, cfg: Dict[str, Any], work: str, server,
                results: Dict[Tuple[str, str, str], Dict[str, Any]]) -> None:
    """12. Waiting at scale: each case of bench/waiters.py in a process of its own (it starts
    its own resolving processes) on a new database, one case at a time."""
    p = cfg["waiters"]
    args = {"async": [p["async"]], "poll": [p["poll"]], "threads": [p["threads"]], "last": [],
            "procs": list(p["procs"]), "hb": [p["hb"]]}
    for case in WAITER_CASES:
        if backend == "sqlite":
            url = f"sqlite:///{work}/waiters-{case}.db"
        else:
            url = server.create_database("bench_waiters")
        log(f"[{backend}] 12. waiting at scale: {case} {' '.join(map(str, args[case]))}")
        try:
            proc = subprocess.run([sys.executable, str(BENCH / "waiters.py"), case, url,
                                   *map(str, args[case])],
                                  capture_output=True, text=True, timeout=1800)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                res: Dict[str, Any] = {"error": f"exit {proc.returncode}",
                                       "detail": (proc.stderr or proc.stdout)[-2500:]}
                log(f"    ! {case}: {res['detail'][-600:]}")
            else:
                res = json.loads(lines[-1])
                log(f"    {json.dumps(res)}")
        except subprocess.TimeoutExpired as exc:
            res = {"error": "timeout", "detail": str(exc)}
        results[(backend, f"waiters:{case}", "cmbagent_db")] = res
        if backend != "sqlite":
            server.drop_database(url)


def render_waiters(results, backends: List[str], cfg) -> str:
    """The table of waiting at scale, with the 2 s poll beside it as the anchor."""
    p = cfg.get("waiters")
    if not p:
        return ""
    lines = ["| backend | case | cmbagent_db | anchor: 2 s poll | target | met? |",
             "|---|---|---|---|---|---|"]

    def get(b: str, case: str) -> Dict[str, Any]:
        return results.get((b, f"waiters:{case}", "cmbagent_db")) or {}

    def line(b, label, ours, anchor, target, ok):
        met = "not measured" if ok is None else ("met" if ok else "**missed**")
        lines.append(f"| {b} | {label} | {ours} | {anchor} | {target} | {met if target else ''} |")

    def num(d: Dict[str, Any], key: str, unit: str) -> str:
        if "error" in d:
            return "error"
        return "—" if d.get(key) is None else f"{d[key]:,}{unit}"

    for b in backends:
        a, poll, th, last, procs, hb = (get(b, c) for c in WAITER_CASES)
        if not any((a, poll, th, last, procs, hb)):
            continue
        n, npoll = p["async"], p["poll"]
        per, k = p["procs"]
        line(b, f"12a. {n:,} wait_async in one event loop: idle CPU of the waiting process",
             num(a, "idle_cpu_pct", " %"), num(poll, "idle_cpu_pct", " %") + f" ({npoll:,} pollers)",
             "< 1 % of a core", a.get("idle_cpu_pct", 1e9) < 1 if "idle_cpu_pct" in a else None)
        for q, limit in (("p50", 5), ("p99", 50)):
            line(b, f"12b. wake-up after each resolve, {n:,} resolved back to back from another "
                    f"process: {q}", num(a, f"{q}_ms", " ms"), num(poll, f"{q}_ms", " ms"),
                 f"≤ {limit} ms", a[f"{q}_ms"] <= limit if f"{q}_ms" in a else None)
        line(b, f"12c. {n:,} wait_async: woken", num(a, "woken", ""), num(poll, "woken", ""),
             f"all {n:,}", a.get("woken") == n if "woken" in a else None)
        line(b, f"12d. {p['threads']:,} wait() threads: idle CPU", num(th, "idle_cpu_pct", " %"),
             "—", "< 1 % of a core",
             th["idle_cpu_pct"] < 1 if "idle_cpu_pct" in th else None)
        if b == "postgresql":
            line(b, f"12e. {p['threads']:,} wait() threads: server connections of the waiting process",
                 num(th, "server_connections", ""), "1 (one shared connection)",
                 "its pool + 1", None if "server_connections" not in th else th["server_connections"] <= 2)
        line(b, "12f. the last of 64 waiters, resolved alone: slowest wake-up of 5",
             num(last, "max_ms", " ms"), "—", "≤ 10 ms",
             last["max_ms"] <= 10 if "max_ms" in last else None)
        for q, limit in (("p50", 5), ("p99", 50)):
            line(b, f"12g. {k} processes × {per:,} wait_async, resolved from a fifth: {q} "
                    f"(woken: {num(procs, 'woken', '')} of {per * k:,})",
                 num(procs, f"{q}_ms", " ms"), "—", f"≤ {limit} ms",
                 procs[f"{q}_ms"] <= limit if f"{q}_ms" in procs else None)
        line(b, f"12h. heartbeat_many of {p['hb']:,} task ids vs {p['hb']:,} heartbeat() calls",
             "—" if "ratio" not in hb else f"{hb['ratio']:,}× ({hb['many_s'] * 1e3:,.1f} ms vs "
             f"{hb['single_s']:,.2f} s)", "—", "≥ 20×", hb["ratio"] >= 20 if "ratio" in hb else None)
    return "\n".join(lines)


def snapshot_package(work: str) -> Optional[str]:
    """Copies the installed cmbagent_db package (native module included) into ``work`` and
    puts it first on the path of this process and of every worker: others may rebuild the
    package while the benchmark runs, and every system must see one and the same build."""
    import importlib.util

    found = importlib.util.find_spec("cmbagent_db")
    if found is None or not found.submodule_search_locations:
        return "cmbagent_db is not installed: build it with `.venv/bin/maturin develop --release`"
    src = Path(list(found.submodule_search_locations)[0])
    dest = Path(work) / "pkg"
    shutil.copytree(src, dest / "cmbagent_db", ignore=shutil.ignore_patterns("__pycache__"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(dest)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    sys.path.insert(0, str(dest))
    try:
        import cmbagent_db  # noqa: F401
    except ImportError as exc:
        return f"cmbagent_db is not importable ({exc}): build it with `.venv/bin/maturin develop --release`"
    log(f"cmbagent_db {cmbagent_db.__version__} from {src} (snapshot in {dest})")
    return None


def _cargo() -> Optional[str]:
    home = Path.home() / ".cargo/bin/cargo"
    return shutil.which("cargo") or (str(home) if home.exists() else None)


def build_core() -> "tuple[Optional[str], Optional[str]]":
    """Builds examples/core_bench.rs (cargo build --release --example core_bench).
    Returns (binary, None) or (None, why not)."""
    cargo = _cargo()
    if cargo is None:
        return None, "cargo not found"
    log("building the Rust core benchmark: cargo build --release --example core_bench")
    proc = subprocess.run([cargo, "build", "--release", "--example", "core_bench"],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return None, "cargo build failed: " + proc.stderr[-1500:]
    return str(ROOT / "target" / "release" / "examples" / "core_bench"), None


class Row:
    """One line of the table. kind: rate (higher is better, value = ops/s), time (value =
    seconds, lower is better), mem (bytes, lower is better), scale (a ratio per system).
    ``secs``: each system's repetitions, round by round (for the paired ratios)."""

    def __init__(self, backend: str, label: str, kind: str, unit: str,
                 values: Dict[str, Optional[float]], targets: List[Tuple[str, str, float]],
                 errors: Dict[str, str], note: str = "",
                 secs: Optional[Dict[str, List[float]]] = None) -> None:
        self.backend, self.label, self.kind, self.unit = backend, label, kind, unit
        self.values, self.targets, self.errors, self.note = values, targets, errors, note
        self.secs = secs or {}

    def ratio(self, other: str) -> Optional[float]:
        """cmbagent_db's advantage over `other`: speed-up (rate, time) or memory share (mem)."""
        a, b = self.values.get("cmbagent_db"), self.values.get(other)
        if a is None or b is None or a == 0 or b == 0 or self.kind == "scale":
            return None
        if self.kind == "rate":
            return a / b
        if self.kind == "time":
            return b / a
        return a / b  # mem: cmbagent_db's share of the other's peak

    def paired(self, other: str) -> Optional[float]:
        """The median over rounds of the speed-up within each round: the systems ran back to
        back in a round, so this cancels the drift of the machine's load between rounds."""
        a, b = self.secs.get("cmbagent_db"), self.secs.get(other)
        if self.kind not in ("rate", "time") or not a or not b or len(a) != len(b) or len(a) < 2:
            return None
        return median([y / x for x, y in zip(a, b) if x > 0])

    def checks(self) -> List[Tuple[str, Optional[bool], Optional[bool]]]:
        """(target, met by the ratio of medians, met by the paired ratio)."""
        out = []
        for against, op, threshold in self.targets:
            def meets(v: Optional[float]) -> Optional[bool]:
                return None if v is None else (v >= threshold if op == ">=" else v <= threshold)

            if against == "self":
                v, pv = self.values.get("cmbagent_db"), None
                txt = f"cmbagent_db ≤ {threshold:g}×"
            else:
                v, pv = self.ratio(against), self.paired(against)
                name = SYSTEM_LABEL[against].split()[0] if against != "raw" else "raw"
                txt = f"{'≥' if op == '>=' else '≤'} {threshold:g}× {name}"
            out.append((txt, meets(v), meets(pv)))
        return out


def verdict(ok: Optional[bool], paired_ok: Optional[bool], md: bool = True) -> str:
    if ok is None:
        return "not measured"
    word = "met" if ok else ("**missed**" if md else "MISSED")
    if paired_ok is not None and paired_ok != ok:
        word += " (inconclusive: the paired ratio " + ("meets" if paired_ok else "misses") + " it)"
    return word


def fmt_value(row: Row, system: str) -> str:
    if system in row.errors:
        return "error"
    v = row.values.get(system)
    if v is None:
        return "—"
    if row.kind == "rate":
        return f"{v:,.0f}"
    if row.kind == "time":
        return f"{v * 1e3:,.2f}" if row.unit == "ms" else f"{v:,.3f}"
    if row.kind == "mem":
        return f"{v / 2**20:,.0f}"
    return f"{v:.2f}×"


def fmt_ratio(row: Row, other: str) -> str:
    r = row.ratio(other)
    if r is None:
        return "—"
    if row.kind == "mem":
        return f"{r:.2f}× the memory"
    p = row.paired(other)
    return f"{r:.2f}×" + (f" ({p:.2f}×)" if p is not None else "")


def build_rows(results, backends: List[str], cfg) -> List[Row]:
    rows: List[Row] = []

    secs: Dict[str, List[float]] = {}

    def vals(backend, workload, fn) -> Tuple[Dict[str, Optional[float]], Dict[str, str]]:
        v, e = {}, {}
        secs.clear()
        for system in SYSTEMS + ("core",):
            res = results.get((backend, workload, system))
            if res is None:
                continue
            if "error" in res:
                e[system] = res["error"]
                continue
            v[system] = fn(res)
            secs[system] = list(res.get("secs") or [])
        return v, e

    def returned_row(backend: str, workload: str, label: str, kind: str, unit: str,
                     fn: Callable[[float], float]) -> Optional[Row]:
        """The same repetitions timed until the call returned, before the WAL copy (SQLite:
        what a caller waits for; cmbagent_db copies on a background thread)."""
        v: Dict[str, Optional[float]] = {}
        rsecs: Dict[str, List[float]] = {}
        for system in SYSTEMS:
            res = results.get((backend, workload, system)) or {}
            if res.get("returned_secs"):
                rsecs[system] = list(res["returned_secs"])
                v[system] = fn(median(rsecs[system]))
        if "cmbagent_db" not in v:
            return None
        return Row(backend, label, kind, unit, v, [], {},
                   note="until the call returns; the WAL copy after it is left out", secs=rsecs)

    for b in backends:
        sq = b == "sqlite"
        table_n = cfg["table"]
        n1 = cfg["create_commit"]["n"]
        v, e = vals(b, "create_commit", lambda r: n1 / median(r["secs"]))
        rows.append(Row(b, "1. create_pending + commit, 1 txn each", "rate", "commits/s", v,
                        [("raw", ">=", 0.9)] if sq else [], e, secs=dict(secs)))
        nrows = cfg["bulk_insert"]["rows"]
        v, e = vals(b, "bulk_insert", lambda r: nrows / median(r["secs"]))
        rows.append(Row(b, f"2. bulk insert {nrows:,} create_pending, 1 txn", "rate", "rows/s", v,
                        [("sqlalchemy", ">=", 10), ("raw", ">=", 1.5)] if sq else [("sqlalchemy", ">=", 3)], e,
                        secs=dict(secs)))
        latency = returned_row(b, "bulk_insert", f"2b. bulk insert {nrows:,}: until commit() returns",
                               "rate", "rows/s", lambda t: nrows / t)
        if latency is not None:
            rows.append(latency)
        nl = cfg["lookup"]["n"]
        v, e = vals(b, "lookup", lambda r: nl / median(r["secs"]))
        rows.append(Row(b, f"3. lookup by id, .filter(id == x).first() ({table_n:,} rows)", "rate", "lookups/s", v,
                        [("sqlalchemy", ">=", 30), ("raw", ">=", 0.8)] if sq else [("sqlalchemy", ">=", 2.5)], e,
                        secs=dict(secs)))
        v, e = vals(b, "overdue", lambda r: 1 / median(r["secs"]))
        rows.append(Row(b, f"4. overdue query, 1,000 of {table_n:,} rows", "rate", "queries/s", v,
                        [("sqlalchemy", ">=", 5), ("raw", ">=", 1)] if sq else [], e, secs=dict(secs)))
        small, large = cfg["sweep_sizes"]
        vs, es = vals(b, f"sweep:{small}", lambda r: median(r["secs"]))
        rows.append(Row(b, f"5a. expiry sweep, 1,000 of {small:,} rows", "time", "ms", vs, [], es, secs=dict(secs)))
        vl, el = vals(b, f"sweep:{large}", lambda r: median(r["secs"]))
        rows.append(Row(b, f"5b. expiry sweep, 1,000 of {large:,} rows", "time", "ms", vl, [], el, secs=dict(secs)))
        scale: Dict[str, Optional[float]] = {}
        for name, big_t in vl.items():
            small_t = vs.get(name)
            if big_t is not None and small_t:
                scale[name] = big_t / small_t
        rows.append(Row(b, f"5c. sweep scaling: time({large:,}) / time({small:,})", "scale", "ratio",
                        scale, [("self", "<=", 1.5)],
                        {**es, **el}, note="" if sq else "the same bound holds on PostgreSQL"))
        for n, label in ((small, "5d"), (large, "5e")):
            latency = returned_row(b, f"sweep:{n}", f"{label}. expiry sweep, 1,000 of {n:,} rows: "
                                   "until commit() returns", "time", "ms", lambda t: t)
            if latency is not None:
                rows.append(latency)
        nh = cfg["heartbeat"]["connections"]
        v, e = vals(b, "heartbeat", lambda r: nh / median(r["secs"]))
        path = results.get((b, "heartbeat", "cmbagent_db"), {}).get("path", "")
        rows.append(Row(b, f"6. heartbeat of {nh} connections, 1 txn each", "rate", "heartbeats/s", v,
                        [("raw", ">=", 0.9)] if sq else [], e,
                        note=f"cmbagent_db via {path}" if path else "", secs=dict(secs)))
        orm = results.get((b, "heartbeat_orm", "cmbagent_db"))
        if orm is not None:
            v2 = dict(v)
            e2 = {k: x for k, x in e.items() if k != "cmbagent_db"}
            if "error" in orm:
                e2["cmbagent_db"] = orm["error"]
                v2.pop("cmbagent_db", None)
            else:
                v2["cmbagent_db"] = nh / median(orm["secs"])
            secs2 = dict(secs, cmbagent_db=list(orm.get("secs") or []))
            rows.append(Row(b, "6b. heartbeat, cmbagent_db through the ORM path", "rate", "heartbeats/s",
                            v2, [], e2, note="load + assign + commit, as SQLAlchemy does", secs=secs2))
        v, e = vals(b, "load_all", lambda r: median(r["secs"]))
        rows.append(Row(b, f"7a. .all() of {table_n:,} approvals: time", "time", "s", v, [], e, secs=dict(secs)))
        v, e = vals(b, "load_all", lambda r: r["peak_delta_kb"] * 1024.0)
        rows.append(Row(b, f"7b. .all() of {table_n:,} approvals: peak RSS growth", "mem", "MB", v,
                        [("sqlalchemy", "<=", 0.5)] if sq else [], e))
        rel = cfg.get("relationship") or {}
        for mode, label, note in (
            ("lazy", "8a", "lazy: each run's first access of .approval_requests runs its own "
                           "query (N+1); raw: one SELECT per run by hand"),
            ("selectin", "8b", "query(WorkflowRun).options(selectinload(WorkflowRun.approval_requests))"
                               "; raw: one IN query per 500 runs, grouped by hand"),
            ("join", "8c", "query(ApprovalRequest, WorkflowRun).join(WorkflowRun, ...).all(): "
                           "(approval, run) pairs, each run one object; raw: the same JOIN"),
        ):
            if not any((b, f"rel:{mode}", s) in results for s in SYSTEMS):
                continue  # a run saved before this workload existed
            v, e = vals(b, f"rel:{mode}", lambda r: median(r["secs"]))
            rows.append(Row(b, f"{label}. relationship load over {rel.get('runs', 1000):,} runs "
                            f"({rel.get('per_run', 3)} approvals each): {mode}", "time", "ms",
                            v, [], e, note=note, secs=dict(secs)))
        for key, label, what, note in (
            ("bridge", "9", "SQLAlchemy ORM on cmbagent_db's driver",
             "the cmbagent_db column is SQLAlchemy's ORM on cmbagent_db's driver; the ratio is "
             "the driver's cost"),
            ("five_in_bridge", "10", "the five models in a bridge session",
             "the cmbagent_db column runs rows 1 / 3 in cmbagent_db.sqlalchemy sessions (Base "
             "also maps another model; the lookups' session holds one of its objects); the raw "
             "column is cmbagent_db's own get_db_session(): vs raw is the bridge's cost"),
            ("tls", "11", "over TLS (sslmode=require)",
             "rows 1 / 3 with sslmode=require for every system: rustls in cmbagent_db, "
             "OpenSSL through libpq in psycopg2"),
        ):
            if not any((b, f"{key}:create_commit", s) in results for s in SYSTEMS):
                continue  # a run saved before this workload existed
            v, e = vals(b, f"{key}:create_commit", lambda r: n1 / median(r["secs"]))
            rows.append(Row(b, f"{label}a. {what}: create + commit", "rate",
                            "commits/s", v, [], e, note=note, secs=dict(secs)))
            v, e = vals(b, f"{key}:lookup", lambda r: nl / median(r["secs"]))
            rows.append(Row(b, f"{label}b. {what}: lookup by id", "rate",
                            "lookups/s", v, [], e, note=note, secs=dict(secs)))
    return rows


def render_table(rows: List[Row]) -> str:
    head = ("| backend | workload | unit | cmbagent_db | SQLAlchemy | raw driver | Rust core (no Python) "
            "| cmbagent_db vs SQLAlchemy | cmbagent_db vs raw | target | met? |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        checks = r.checks()
        target = "; ".join(t for t, _, _ in checks) or (r.note and f"({r.note})") or ""
        met = "; ".join(verdict(ok, pok) for _, ok, pok in checks)
        if r.kind == "scale":
            vs_sqla = vs_raw = "—"
        else:
            vs_sqla, vs_raw = fmt_ratio(r, "sqlalchemy"), fmt_ratio(r, "raw")
        label = r.label + (f" ({r.note})" if r.note and checks else "")
        lines.append(
            f"| {r.backend} | {label} | {r.unit} | {fmt_value(r, 'cmbagent_db')} | "
            f"{fmt_value(r, 'sqlalchemy')} | {fmt_value(r, 'raw')} | {fmt_value(r, 'core')} | "
            f"{vs_sqla} | {vs_raw} | {target} | {met} |")
    return "\n".join(lines)


def render_targets(rows: List[Row], md: bool = True) -> str:
    out = []
    for r in rows:
        for text, ok, pok in r.checks():
            if r.kind == "scale":
                v = r.values.get("cmbagent_db")
                got = f"{v:.2f}×" if v is not None else "—"
            else:
                against = "raw" if text.endswith("raw") else "sqlalchemy"
                ratio, paired = r.ratio(against), r.paired(against)
                got = f"{ratio:.2f}×" if ratio is not None else "—"
                if paired is not None:
                    got += f" (paired per round: {paired:.2f}×)"
            word = verdict(ok, pok, md)
            out.append(f"- {r.backend}, {r.label}: {text} → measured {got}: "
                       + (f"**{word}**" if md and "**" not in word else word))
    return "\n".join(out)


def render_boundary(rows: List[Row]) -> str:
    out = []
    for r in rows:
        core, cmb = r.values.get("core"), r.values.get("cmbagent_db")
        if core and cmb:
            out.append(f"- {r.backend}, {r.label}: Rust core {core:,.0f} {r.unit}, through Python "
                       f"{cmb:,.0f} {r.unit}: the Python layer keeps {cmb / core:.0%} of the core's "
                       f"speed ({(1 / cmb - 1 / core) * 1e6:,.1f} µs per operation).")
    return "\n".join(out)


def render_spread(results, backends) -> str:
    out = ["| backend | workload | system | repetitions (ms) |", "|---|---|---|---|"]
    for (b, w, s), res in sorted(results.items()):
        if b in backends and "secs" in res:
            out.append(f"| {b} | {w} | {SYSTEM_LABEL[s]} | "
                       + ", ".join(f"{x * 1e3:.1f}" for x in res["secs"]) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------


def _sh(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=60).stdout.strip()
    except Exception:
        return ""


def machine_info(server) -> Dict[str, str]:
    import sqlite3

    import cmbagent_db
    import psycopg2
    import sqlalchemy

    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    import hashlib

    native = Path(cmbagent_db._native.__file__)
    native_sha = hashlib.sha256(native.read_bytes()).hexdigest()[:12]
    dirty = _sh(["git", "status", "--porcelain", "--", "src", "python", "Cargo.toml", "Cargo.lock"])
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": _sh(["nproc"]) or str(os.cpu_count()),
        "memory": mem,
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version + " (system library; cmbagent_db links the same one)",
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg2": psycopg2.__version__.split()[0],
        "cmbagent_db": f"{cmbagent_db.__version__}, native module built "
        + datetime.fromtimestamp(native.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        + f" (sha256 {native_sha}…; a snapshot of it served the whole run)",
        "rustc": _sh(["rustc", "--version"]) or _sh([str(Path.home() / ".cargo/bin/rustc"), "--version"]),
        "git": (_sh(["git", "rev-parse", "--short", "HEAD"]) or "?")
        + (f" (working tree has uncommitted changes in {len(dirty.splitlines())} files under src/, python/)" if dirty else ""),
    }
    newest = max((f.stat().st_mtime, f) for f in (ROOT / "src").rglob("*.rs"))
    if newest[0] > native.stat().st_mtime:
        info["warning"] = (
            f"the native module is older than {newest[1].relative_to(ROOT)} (changed "
            + datetime.fromtimestamp(newest[0], timezone.utc).strftime("%H:%M UTC")
            + "): cmbagent_db was measured without the latest src/ changes, while the Rust core "
            "example was built from the working tree at the start of the run")
    if server is not None:
        s = server.settings()
        info["postgresql"] = (f"{server.version()} ({server.description}; fsync={s['fsync']}, "
                              f"synchronous_commit={s['synchronous_commit']}, "
                              f"full_page_writes={s['full_page_writes']}, shared_buffers={s['shared_buffers']})")
    return info


def write_report(path: Path, info, rows, results, backends, cfg, command, quick, elapsed) -> str:
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    rel = cfg.get("relationship") or {}
    rel_runs, rel_per = rel.get("runs", 1000), rel.get("per_run", 3)
    md = f"""# Benchmarks

cmbagent_db against SQLAlchemy 2 (cmbagent's models) and the raw drivers.
Ratios measured in one run are what these shared machines can compare; absolute numbers
move from run to run.

Reproduce with:

```
{command}
```

{'**Quick run** (`--quick`): fewer repetitions and smaller sweep tables; a smoke test, not the result.' if quick else ''}

## Results

Higher is better for ops/s; lower for ms, s and MB. "vs" columns: how many times faster
cmbagent_db is -- the ratio of the medians, and in parentheses the median of the per-round
ratios (in each round the systems run back to back, so this one cancels the drift of the
machine's load; where the two disagree about a target, the verdict says so). For peak
memory: cmbagent_db's peak as a share of the other's. Medians of the repetitions after a
warm-up; run time {elapsed / 60:.1f} min.

{render_table(rows)}

### Targets

{render_targets(rows)}

### The Python boundary

{render_boundary(rows) or '(the Rust core benchmark did not run)'}

## Waiting at scale

bench/waiters.py, each case in a process of its own on a new database (rows 12a-12h). The
waiters wait in one process (12g: in {cfg.get('waiters', {}).get('procs', [0, 0])[1]} processes) and another process resolves
every request back to back, one commit each; a wake-up is the time from a resolve's commit
returning in the resolving process to the waiting coroutine running again (the two wall
clocks of one machine). Idle CPU: all threads of the waiting process, as a share of one
core, over 5 s with every request waited on and nothing happening.

The anchor is the design waiting replaced in the plan this package implements: each waiter
re-reads its request every 2 s, here as one asyncio task per waiter on one raw-driver
connection per process, the cheapest form of it, measured the same way. The design before
the shared watcher (a thread and a connection per waiter, polling SQLite every 1 ms) is not
in the code any more; measured on it before it was replaced, on this kind of machine: with 12
concurrent `wait_async`, the 12th request's waiter woke 7,003 ms after it was resolved
(asyncio's default executor has 6 threads here); 120 `wait` threads on PostgreSQL: 21 failed
with `too many clients already`; six idle SQLite waiters used about 11% of a core. It does
not run at these sizes.

{render_waiters(results, backends, cfg) or '(not measured in this run)'}

## Machine and versions

{machine}

## How it measures

- Same settings on every side. SQLite: WAL, `foreign_keys=ON`, `synchronous=FULL` --
  set explicitly for raw `sqlite3` and for SQLAlchemy (a `connect` event) and checked with
  `PRAGMA` before timing; given in cmbagent_db's URL (`?synchronous=FULL`, its default).
  PostgreSQL: `fsync`, `synchronous_commit` and `full_page_writes` on (checked), TCP to
  127.0.0.1 with password auth; data directory on the same disk as the SQLite files.
- Same data. Every database is migrated by `cmbagent_db.init_database(url)` and filled through
  the raw driver: 10 sessions, 100 runs, 200 active connections, and for the read workloads
  {cfg['table']:,} approvals of which 1,000 pending and overdue, 1,000 pending and not yet due,
  the rest resolved / expired / cancelled, in random order. PostgreSQL masters are
  `VACUUM ANALYZE`d (what autovacuum does); SQLite has no `ANALYZE` (cmbagent never runs it).
  Systems that write get their own fresh copy (a copied file, or `CREATE DATABASE ...
  TEMPLATE`); the bulk insert a fresh copy per repetition; the sweep puts the same 1,000 rows
  back to pending between repetitions (outside the timing; `VACUUM` on PostgreSQL, WAL
  checkpoint on SQLite) and checks that nothing overdue is left.
- Each (system, workload) runs in its own process (one per system, so no heap, cache or
  garbage-collector state crosses over), set up and warmed up before any timing starts. The
  driver then asks the systems in turn for one timed repetition each, in an order that goes
  through every permutation round by round, so a drift in this shared machine's load falls on
  every system alike and each follows each other equally often; before each repetition of a
  workload that writes, `sync` flushes dirty pages so no system pays for another's writes.
  A SQLite repetition that writes ends when the WAL is fully checkpointed, inside the
  timing, on every side: raw sqlite3 and SQLAlchemy copy the WAL into the database file
  inside their commits (SQLite's default), cmbagent_db on a background thread, and each
  system is charged for all the copying its writes caused. (What a caller waits for in
  cmbagent_db is less: its commit returns before the copy.)
  The median of each system's repetitions is reported, and every repetition is listed at the
  end.
- Call patterns (bench/workloads.py): cmbagent_db and SQLAlchemy run the same code --
  one session per transaction for workloads 1 and 6 (a request handler's pattern), one
  session for all lookups of a repetition, a session per overdue query and per sweep;
  `create_pending` objects with their contexts, `add` / `add_all` / `commit`,
  `query(M).filter(M.id == x).first()`, `filter(M.status == "pending", M.expires_at < now)`
  with `.all()` or `.update({{"status": "expired"}})`, heartbeats as load + assign + commit
  (cmbagent_db uses `cmbagent_db.connections.heartbeat` where it exists, and row 6b times the
  ORM path too). The raw drivers run the hand-written SQL a careful programmer would write:
  one `UPDATE` per heartbeat, `executemany` (sqlite3) or `execute_values` (psycopg2) for the
  bulk insert, tuples from `fetchone` / `fetchall` (no objects built).
- Peak memory of `.all()`: a fresh process per measurement; peak RSS (`VmHWM`, reset through
  `/proc/self/clear_refs` just before the load) minus RSS before it, so allocations made in
  Rust count as well as Python's. Median of {cfg['load_all']['runs']} processes.
- Relationship loads and joins (rows 8a, 8b, 8c): a database of {rel_runs:,} workflow runs (the 100 above and
  more of the same sessions), each with {rel_per:,} approvals, read by every system; per
  repetition a fresh session runs `query(WorkflowRun).all()` and iterates every run's
  `run.approval_requests` (SQLAlchemy: cmbagent's `relationship()`, no `order_by`;
  cmbagent_db orders each collection by id), then closes the session, all inside the timing.
  Lazy: each collection loads on first access, one query per run. selectinload: the runs'
  collections in one more query per 500 runs (both ORMs batch by 500). The raw drivers:
  the same SELECTs by hand, tuples grouped in a dict for the eager case. Join (8c): one
  `query(ApprovalRequest, WorkflowRun).join(WorkflowRun, ApprovalRequest.run_id == WorkflowRun.id)`
  returning every (approval, run) pair, each run one object however many approvals repeat it;
  the raw drivers run the same JOIN and return tuples.
- Rust core (examples/core_bench.rs; `cargo build --release --example core_bench` at the
  start of the run, then its binary with `--serve`, interleaved with the Python systems like a
  fourth one; standalone: `cargo run --release --example core_bench -- <sqlite path>`): the
  same batched multi-row INSERTs as a flush (`Conn::insert_rows`) in one transaction on fresh
  copies, and a `Select` with `id == x` and `LIMIT 1` rendered and run per lookup, no Python.

### Every repetition

{render_spread(results, backends)}
"""
    path.write_text(md)
    return md


# --------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        from workloads import worker_main

        return worker_main()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("sqlite", "postgresql", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, smaller sweep tables (~5 min)")
    ap.add_argument("--out", default="BENCHMARKS.md", help="where to write the report (default BENCHMARKS.md)")
    ap.add_argument("--no-core", action="store_true", help="skip the Rust core benchmark")
    ap.add_argument("--json", help="also save the run (every repetition, machine, settings) to this file")
    ap.add_argument("--from-json", metavar="FILE", help="only re-render --out from a run saved with --json")
    args = ap.parse_args(argv)

    if args.from_json:
        # Re-render a saved run (its own command, machine and numbers), nothing measured.
        saved = json.loads(Path(args.from_json).read_text())
        cfg = dict(saved["cfg"], sweep_sizes=tuple(saved["cfg"]["sweep_sizes"]))
        loaded = {tuple(k.split("|")): v for k, v in saved["results"].items()}
        rows = build_rows(loaded, saved["backends"], cfg)
        write_report(Path(args.out), saved["info"], rows, loaded, saved["backends"], cfg,
                     saved["command"], saved["quick"], saved["elapsed"])
        print(render_table(rows))
        print(f"\nwritten to {args.out}")
        return 0
    backends = ["sqlite", "postgresql"] if args.backend == "all" else [args.backend]
    cfg = QUICK if args.quick else FULL
    command = ".venv/bin/python bench/run.py " + " ".join(shlex.quote(a) for a in argv)
    results: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    server = None
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cmbagent-db-bench-", dir="/tmp" if os.path.isdir("/tmp") else None) as work:
        snapshot_error = snapshot_package(work)
        if snapshot_error:
            sys.exit(snapshot_error)
        core, core_error = (None, "skipped (--no-core)") if args.no_core else build_core()
        if core:
            # The binary as built now, whatever cargo does to target/ during the run.
            core = shutil.copy2(core, os.path.join(work, "core_bench"))
        if core_error:
            log(f"Rust core benchmark unavailable: {core_error}")
        load_before = os.getloadavg()
        for backend in backends:
            if backend == "postgresql":
                from pg_server import get_server

                log("starting PostgreSQL" if not os.environ.get("CMBAGENT_DB_BENCH_PG_URL")
                    else "using CMBAGENT_DB_BENCH_PG_URL")
                server = get_server()
            run_backend(backend, cfg, work, server, results, core)
            run_waiters(backend, cfg, work, server, results)
        info = machine_info(server)
        load_after = os.getloadavg()
        info["load average"] = (
            f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end "
            "(1-minute; other jobs share this machine -- see the spread of repetitions below)")
        if core_error:
            info["Rust core benchmark"] = core_error.splitlines()[0]
        if server is not None:
            server.stop()

    rows = build_rows(results, backends, cfg)
    elapsed = time.monotonic() - start
    out = Path(args.out)
    write_report(out, info, rows, results, backends, cfg, command, args.quick, elapsed)
    print(render_table(rows))
    print()
    print(render_targets(rows, md=False))
    print()
    print(render_boundary(rows))
    print(f"\nwritten to {out} ({elapsed / 60:.1f} min)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "command": command, "quick": args.quick, "elapsed": elapsed, "backends": backends,
            "cfg": cfg, "info": info, "results": {"|".join(k): v for k, v in results.items()},
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

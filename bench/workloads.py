"""The eight workloads, written once per system: cmbagent_db through its public API, as
cmbagent calls it; SQLAlchemy 2 with cmbagent's own models (tests/reference_models.py);
and the raw drivers (``sqlite3`` / ``psycopg2``) with hand-written SQL.

Each system gets a database *descriptor* (a dict: ``{"backend": "sqlite", "path": ...}`` or
``{"backend": "postgresql", "dsn": ...}``) and builds its own URL / connection from it, with
the same durability everywhere: SQLite in WAL mode with ``foreign_keys=ON`` and
``synchronous=FULL`` (set explicitly on every side, and checked), PostgreSQL with the
server's ``synchronous_commit=on``.

This module is imported by bench/run.py's worker processes, one process per (system,
workload), so no system's heap, caches or garbage collector state leaks into another's
numbers.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent

# What every approval in these workloads carries: cmbagent's create_pending arguments.
APPROVAL_TYPE = "plan_approval"
TIMEOUT_SECONDS = 300
SERVER_INSTANCE = "worker-1"

APPROVAL_COLUMNS = (
    "id, run_id, session_id, approval_type, context, status, resolution, result, "
    "created_at, expires_at, resolved_at"
)

# Every column of workflow_runs (what the ORMs load for a run), for the raw drivers.
RUN_COLUMNS = (
    "id, session_id, project_id, mode, agent, model, status, started_at, completed_at, "
    "last_heartbeat_at, checkpoint_frequency_minutes, task_description, meta, "
    "branch_parent_id, is_branch, branch_depth, parent_run_id, stage_number, stage_name"
)

# The joined read of row 8c, as the raw drivers write it: every approval with its run.
JOIN_SQL = (
    "SELECT " + ", ".join(f"a.{c.strip()}" for c in APPROVAL_COLUMNS.split(","))
    + ", " + ", ".join(f"r.{c.strip()}" for c in RUN_COLUMNS.split(","))
    + " FROM approval_requests a JOIN workflow_runs r ON a.run_id = r.id"
)

# selectinload's batch size (SQLAlchemy's and cmbagent_db's): one IN query per 500 parents.
SELECTIN_BATCH = 500


def make_context(i: int) -> Dict[str, Any]:
    return {
        "plan": f"Run step {i} of the analysis",
        "step": i,
        "options": ["approve", "reject", "modify"],
    }


def sqlite_ts(t: datetime) -> str:
    """SQLAlchemy's SQLite storage format for TIMESTAMP: UTC, microseconds, no offset."""
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc).replace(tzinfo=None)
    return t.isoformat(sep=" ", timespec="microseconds")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------------------
# Durability checks
# --------------------------------------------------------------------------------------

SQLITE_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA foreign_keys=ON", "PRAGMA synchronous=FULL")


def check_sqlite_settings(cursor_execute: Callable[[str], Any], who: str) -> None:
    """journal_mode=wal, foreign_keys=1, synchronous=2 (FULL) on the connection a system uses."""
    got = {
        "journal_mode": str(cursor_execute("PRAGMA journal_mode")).lower(),
        "foreign_keys": int(cursor_execute("PRAGMA foreign_keys")),
        "synchronous": int(cursor_execute("PRAGMA synchronous")),
    }
    want = {"journal_mode": "wal", "foreign_keys": 1, "synchronous": 2}
    if got != want:
        raise RuntimeError(f"{who}: SQLite settings {got}, expected {want}")


# --------------------------------------------------------------------------------------
# Systems
# --------------------------------------------------------------------------------------



def orm_relationship_load(db, WR, AR, selectinload, mode: str) -> "tuple[int, int]":
    """``System.relationship_load`` through an ORM session (cmbagent_db's or SQLAlchemy's:
    the same calls)."""
    try:
        if mode == "join":
            pairs = db.query(AR, WR).join(WR, AR.run_id == WR.id).all()
            return len({id(run) for _a, run in pairs}), len(pairs)
        q = db.query(WR)
        if mode == "selectin":
            q = q.options(selectinload(WR.approval_requests))
        runs = q.all()
        touched = 0
        for run in runs:
            for _a in run.approval_requests:
                touched += 1
        return len(runs), touched
    finally:
        db.close()

class System:
    name = ""

    def __init__(self, db: Dict[str, Any]) -> None:
        self.db = db
        self.backend = db["backend"]
        self.run_id: str = db["run_id"]
        self.session_id: str = db["session_id"]
        self.notes: List[str] = []

    # Each workload; the caller times the call.
    def create_commit(self, contexts: Sequence[Dict[str, Any]]) -> None:
        raise NotImplementedError

    def bulk_insert(self, contexts: Sequence[Dict[str, Any]]) -> int:
        raise NotImplementedError

    def lookup(self, ids: Sequence[str]) -> int:
        raise NotImplementedError

    def overdue(self, k: int) -> int:
        raise NotImplementedError

    def sweep(self) -> int:
        raise NotImplementedError

    def heartbeat(self, task_ids: Sequence[str]) -> None:
        raise NotImplementedError

    def load_all(self) -> Any:
        raise NotImplementedError

    def relationship_load(self, mode: str) -> "tuple[int, int]":
        """Loads every workflow run with its approval requests: ``lazy`` touches each run's
        collection (one query per run: N+1), ``selectin`` loads them with selectinload,
        ``join`` reads (approval, run) pairs in one joined query; returns (runs, approvals)."""
        raise NotImplementedError

    def warm(self) -> None:
        """Open the connection (pool) and run a first query, outside the timing."""

    def close(self) -> None: ...


class CmbagentDb(System):
    """cmbagent_db through its public API, exactly as cmbagent calls it."""

    name = "cmbagent_db"

    def __init__(self, db: Dict[str, Any], heartbeat_path: str = "auto") -> None:
        super().__init__(db)
        import cmbagent_db
        from cmbagent_db import get_db_session
        from cmbagent_db.models import ActiveConnection, ApprovalRequest, WorkflowRun

        self.cmbagent_db = cmbagent_db
        self.get_db_session = get_db_session
        self.ApprovalRequest = ApprovalRequest
        self.ActiveConnection = ActiveConnection
        self.WorkflowRun = WorkflowRun
        if self.backend == "sqlite":
            # synchronous=FULL is cmbagent_db's default; said explicitly so that a change
            # of default cannot quietly lower this side's durability.
            self.url = f"sqlite:///{db['path']}?synchronous=FULL"
        else:
            self.url = db["dsn"]
        self.connections = None
        if heartbeat_path in ("auto", "service"):
            try:
                import importlib

                mod = importlib.import_module("cmbagent_db.connections")
                if hasattr(cmbagent_db, "connections"):
                    self.connections = mod
            except ImportError:
                pass
            if heartbeat_path == "service" and self.connections is None:
                raise RuntimeError("cmbagent_db.connections is not available")

    def warm(self) -> None:
        db = self.get_db_session(self.url)
        try:
            db.query(self.ApprovalRequest).filter(self.ApprovalRequest.id == "none").first()
        finally:
            db.close()

    def create_commit(self, contexts):
        AR = self.ApprovalRequest
        for ctx in contexts:
            db = self.get_db_session(self.url)
            try:
                db.add(AR.create_pending(self.run_id, APPROVAL_TYPE, ctx,
                                         timeout_seconds=TIMEOUT_SECONDS,
                                         session_id=self.session_id))
                db.commit()
            finally:
                db.close()

    def bulk_insert(self, contexts):
        AR = self.ApprovalRequest
        run_id, session_id = self.run_id, self.session_id
        db = self.get_db_session(self.url)
        try:
            objs = [AR.create_pending(run_id, APPROVAL_TYPE, ctx, timeout_seconds=TIMEOUT_SECONDS,
                                      session_id=session_id) for ctx in contexts]
            db.add_all(objs)
            db.commit()
        finally:
            db.close()
        return len(objs)

    def lookup(self, ids):
        db = self.get_db_session(self.url)
        try:
            return self.lookups(db, ids)
        finally:
            db.close()

    def lookups(self, db, ids) -> int:
        AR = self.ApprovalRequest
        found = 0
        for x in ids:
            if db.query(AR).filter(AR.id == x).first() is not None:
                found += 1
        return found

    def overdue(self, k):
        AR = self.ApprovalRequest
        n = 0
        for _ in range(k):
            db = self.get_db_session(self.url)
            try:
                n = len(db.query(AR).filter(AR.status == "pending", AR.expires_at < utcnow()).all())
            finally:
                db.close()
        return n

    def sweep(self):
        AR = self.ApprovalRequest
        db = self.get_db_session(self.url)
        try:
            n = db.query(AR).filter(AR.status == "pending", AR.expires_at < utcnow()).update(
                {"status": "expired"}
            )
            db.commit()
        finally:
            db.close()
        return n

    def heartbeat(self, task_ids):
        if self.connections is not None:
            hb = self.connections.heartbeat
            for t in task_ids:
                db = self.get_db_session(self.url)
                try:
                    hb(db, t, server_instance=SERVER_INSTANCE)  # commits its own work
                finally:
                    db.close()
            return
        AC = self.ActiveConnection
        for t in task_ids:
            db = self.get_db_session(self.url)
            try:
                c = db.query(AC).filter(AC.task_id == t).first()
                c.last_heartbeat = utcnow()
                db.commit()
            finally:
                db.close()

    def heartbeat_label(self) -> str:
        return "connections.heartbeat()" if self.connections is not None else "ORM load+assign+commit"

    def load_all(self):
        self._session = self.get_db_session(self.url)
        return self._session.query(self.ApprovalRequest).all()

    def relationship_load(self, mode):
        return orm_relationship_load(self.get_db_session(self.url), self.WorkflowRun,
                                     self.ApprovalRequest, self.cmbagent_db.selectinload, mode)

    def close(self):
        s = getattr(self, "_session", None)
        if s is not None:
            s.close()
        self.cmbagent_db.dispose_engines()


class SqlAlchemy(System):
    """SQLAlchemy 2 ORM with cmbagent's models, as cmbagent uses it today."""

    name = "SQLAlchemy"

    def __init__(self, db: Dict[str, Any]) -> None:
        super().__init__(db)
        tests = str(ROOT / "tests")
        if tests not in sys.path:
            sys.path.insert(0, tests)
        from reference_models import ActiveConnection, ApprovalRequest, WorkflowRun
        from sqlalchemy.orm import selectinload, sessionmaker

        self.ApprovalRequest = ApprovalRequest
        self.ActiveConnection = ActiveConnection
        self.WorkflowRun = WorkflowRun
        self.selectinload = selectinload
        self.engine = self.make_engine(db)
        self.Session = sessionmaker(bind=self.engine, autoflush=False, expire_on_commit=False)

    def make_engine(self, db: Dict[str, Any]) -> Any:
        from sqlalchemy import create_engine, event

        if self.backend == "sqlite":
            engine = create_engine(f"sqlite:///{db['path']}")

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn, _record):
                cur = dbapi_conn.cursor()
                for p in SQLITE_PRAGMAS:
                    cur.execute(p)
                cur.close()

            return engine
        return create_engine("postgresql+psycopg2://" + db["dsn"].split("://", 1)[1])

    def warm(self):
        from sqlalchemy import text

        with self.Session() as db:
            db.query(self.ApprovalRequest).filter(self.ApprovalRequest.id == "none").first()
            if self.backend == "sqlite":
                check_sqlite_settings(lambda sql: db.execute(text(sql)).scalar(), self.name)

    def create_commit(self, contexts):
        AR = self.ApprovalRequest
        for ctx in contexts:
            db = self.Session()
            try:
                db.add(AR.create_pending(self.run_id, APPROVAL_TYPE, ctx,
                                         timeout_seconds=TIMEOUT_SECONDS,
                                         session_id=self.session_id))
                db.commit()
            finally:
                db.close()

    def bulk_insert(self, contexts):
        AR = self.ApprovalRequest
        run_id, session_id = self.run_id, self.session_id
        db = self.Session()
        try:
            objs = [AR.create_pending(run_id, APPROVAL_TYPE, ctx, timeout_seconds=TIMEOUT_SECONDS,
                                      session_id=session_id) for ctx in contexts]
            db.add_all(objs)
            db.commit()
        finally:
            db.close()
        return len(objs)

    def lookup(self, ids):
        AR = self.ApprovalRequest
        found = 0
        db = self.Session()
        try:
            for x in ids:
                if db.query(AR).filter(AR.id == x).first() is not None:
                    found += 1
        finally:
            db.close()
        return found

    def overdue(self, k):
        AR = self.ApprovalRequest
        n = 0
        for _ in range(k):
            db = self.Session()
            try:
                n = len(db.query(AR).filter(AR.status == "pending", AR.expires_at < utcnow()).all())
            finally:
                db.close()
        return n

    def sweep(self):
        AR = self.ApprovalRequest
        db = self.Session()
        try:
            n = db.query(AR).filter(AR.status == "pending", AR.expires_at < utcnow()).update(
                {"status": "expired"}
            )
            db.commit()
        finally:
            db.close()
        return n

    def heartbeat(self, task_ids):
        AC = self.ActiveConnection
        for t in task_ids:
            db = self.Session()
            try:
                c = db.query(AC).filter(AC.task_id == t).first()
                c.last_heartbeat = utcnow()
                db.commit()
            finally:
                db.close()

    def load_all(self):
        self._session = self.Session()
        return self._session.query(self.ApprovalRequest).all()

    def relationship_load(self, mode):
        return orm_relationship_load(self.Session(), self.WorkflowRun, self.ApprovalRequest,
                                     self.selectinload, mode)

    def close(self):
        s = getattr(self, "_session", None)
        if s is not None:
            s.close()
        self.engine.dispose()


class RawSqlite(System):
    """Python's sqlite3 with hand-written SQL: the floor."""

    name = "raw sqlite3"

    def __init__(self, db: Dict[str, Any]) -> None:
        super().__init__(db)
        import sqlite3

        self.conn = sqlite3.connect(db["path"])
        for p in SQLITE_PRAGMAS:
            self.conn.execute(p)

    def warm(self):
        self.conn.execute(f"SELECT {APPROVAL_COLUMNS} FROM approval_requests WHERE id = ? LIMIT 1",
                          ("none",)).fetchone()
        check_sqlite_settings(lambda sql: self.conn.execute(sql).fetchone()[0], self.name)

    _INSERT = (
        "INSERT INTO approval_requests (id, run_id, session_id, approval_type, context, status, "
        "created_at, expires_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)"
    )

    def _row(self, ctx):
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        return (str(uuid.uuid4()), self.run_id, self.session_id, APPROVAL_TYPE, json.dumps(ctx),
                sqlite_ts(now), sqlite_ts(now + timedelta(seconds=TIMEOUT_SECONDS)))

    def create_commit(self, contexts):
        c = self.conn
        for ctx in contexts:
            c.execute(self._INSERT, self._row(ctx))
            c.commit()

    def bulk_insert(self, contexts):
        rows = [self._row(ctx) for ctx in contexts]
        self.conn.executemany(self._INSERT, rows)
        self.conn.commit()
        return len(rows)

    def lookup(self, ids):
        sql = f"SELECT {APPROVAL_COLUMNS} FROM approval_requests WHERE id = ? LIMIT 1"
        ex = self.conn.execute
        found = 0
        for x in ids:
            if ex(sql, (x,)).fetchone() is not None:
                found += 1
        return found

    _OVERDUE = (f"SELECT {APPROVAL_COLUMNS} FROM approval_requests "
                "WHERE status = 'pending' AND expires_at < ?")

    def overdue(self, k):
        n = 0
        for _ in range(k):
            n = len(self.conn.execute(self._OVERDUE, (sqlite_ts(utcnow()),)).fetchall())
        return n

    def sweep(self):
        cur = self.conn.execute(
            "UPDATE approval_requests SET status = 'expired' "
            "WHERE status = 'pending' AND expires_at < ?",
            (sqlite_ts(utcnow()),),
        )
        self.conn.commit()
        return cur.rowcount

    def heartbeat(self, task_ids):
        c = self.conn
        for t in task_ids:
            c.execute("UPDATE active_connections SET last_heartbeat = ? WHERE task_id = ?",
                      (sqlite_ts(utcnow()), t))
            c.commit()

    def load_all(self):
        return self.conn.execute(f"SELECT {APPROVAL_COLUMNS} FROM approval_requests").fetchall()

    def relationship_load(self, mode):
        ex = self.conn.execute
        if mode == "join":
            pairs = ex(JOIN_SQL).fetchall()
            self.conn.commit()
            return len({r[1] for r in pairs}), len(pairs)
        runs = ex(f"SELECT {RUN_COLUMNS} FROM workflow_runs").fetchall()
        touched = 0
        if mode == "selectin":
            # What selectinload does by hand: one IN query per 500 runs, grouped by run.
            ids = [r[0] for r in runs]
            by_run: Dict[str, list] = {}
            for i in range(0, len(ids), SELECTIN_BATCH):
                chunk = ids[i:i + SELECTIN_BATCH]
                for row in ex(f"SELECT {APPROVAL_COLUMNS} FROM approval_requests WHERE run_id IN "
                              f"({', '.join('?' * len(chunk))})", chunk).fetchall():
                    by_run.setdefault(row[1], []).append(row)
            for r in runs:
                for _a in by_run.get(r[0], ()):
                    touched += 1
        else:
            sql = f"SELECT {APPROVAL_COLUMNS} FROM approval_requests WHERE run_id = ?"
            for r in runs:
                for _a in ex(sql, (r[0],)).fetchall():
                    touched += 1
        self.conn.commit()
        return len(runs), touched

    def close(self):
        self.conn.close()


class RawPsycopg2(System):
    """psycopg2 with hand-written SQL: the floor."""

    name = "raw psycopg2"

    def __init__(self, db: Dict[str, Any]) -> None:
        super().__init__(db)
        import psycopg2
        import psycopg2.extras

        self.extras = psycopg2.extras
        self.conn = psycopg2.connect(db["dsn"])

    def warm(self):
        cur = self.conn.cursor()
        cur.execute(f"SELECT {APPROVAL_COLUMNS} FROM approval_requests WHERE id = %s LIMIT 1", ("none",))
        cur.fetchone()
        cur.execute("SHOW synchronous_commit")
        if cur.fetchone()[0] != "on":
            raise RuntimeError("PostgreSQL synchronous_commit is not on")
        self.conn.commit()

    _INSERT = (
        "INSERT INTO approval_requests (id, run_id, session_id, approval_type, context, status, "
        "created_at, expires_at) VALUES (%s, %s, %s, %s, %s, 'pending', %s, %s)"
    )

    def _row(self, ctx):
        now = datetime.now(timezone.utc)
        return (str(uuid.uuid4()), self.run_id, self.session_id, APPROVAL_TYPE, json.dumps(ctx),
                now, now + timedelta(seconds=TIMEOUT_SECONDS))

    def create_commit(self, contexts):
        cur = self.conn.cursor()
        for ctx in contexts:
            cur.execute(self._INSERT, self._row(ctx))
            self.conn.commit()

    def bulk_insert(self, contexts):
        rows = [self._row(ctx) for ctx in contexts]
        cur = self.conn.cursor()
        # The fast path a hand-written psycopg2 program uses: multi-row VALUES.
        self.extras.execute_values(
            cur,
            "INSERT INTO approval_requests (id, run_id, session_id, approval_type, context, "
            "status, created_at, expires_at) VALUES %s",
            rows,
            template="(%s, %s, %s, %s, %s, 'pending', %s, %s)",
            page_size=1000,
        )
        self.conn.commit()
        return len(rows)

    def lookup(self, ids):
        sql = f"SELECT {APPROVAL_COLUMNS} FROM approval_requests WHERE id = %s LIMIT 1"
        cur = self.conn.cursor()
        found = 0
        for x in ids:
            cur.execute(sql, (x,))
            if cur.fetchone() is not None:
                found += 1
        self.conn.commit()
        return found

    def overdue(self, k):
        cur = self.conn.cursor()
        n = 0
        for _ in range(k):
            cur.execute(f"SELECT {APPROVAL_COLUMNS} FROM approval_requests "
                        "WHERE status = 'pending' AND expires_at < %s", (utcnow(),))
            n = len(cur.fetchall())
            self.conn.commit()
        return n

    def sweep(self):
        cur = self.conn.cursor()
        cur.execute("UPDATE approval_requests SET status = 'expired' "
                    "WHERE status = 'pending' AND expires_at < %s", (utcnow(),))
        n = cur.rowcount
        self.conn.commit()
        return n

    def heartbeat(self, task_ids):
        cur = self.conn.cursor()
        for t in task_ids:
            cur.execute("UPDATE active_connections SET last_heartbeat = %s WHERE task_id = %s",
                        (utcnow(), t))
            self.conn.commit()

    def load_all(self):
        cur = self.conn.cursor()
        cur.execute(f"SELECT {APPROVAL_COLUMNS} FROM approval_requests")
        return cur.fetchall()

    def relationship_load(self, mode):
        cur = self.conn.cursor()
        if mode == "join":
            cur.execute(JOIN_SQL)
            pairs = cur.fetchall()
            self.conn.commit()
            return len({r[1] for r in pairs}), len(pairs)
        cur.execute(f"SELECT {RUN_COLUMNS} FROM workflow_runs")
        runs = cur.fetchall()
        touched = 0
        if mode == "selectin":
            # What selectinload does by hand: one query per 500 runs, grouped by run.
            ids = [r[0] for r in runs]
            by_run: Dict[str, list] = {}
            for i in range(0, len(ids), SELECTIN_BATCH):
                cur.execute(f"SELECT {APPROVAL_COLUMNS} FROM approval_requests "
                            "WHERE run_id = ANY(%s)", (ids[i:i + SELECTIN_BATCH],))
                for row in cur.fetchall():
                    by_run.setdefault(row[1], []).append(row)
            for r in runs:
                for _a in by_run.get(r[0], ()):
                    touched += 1
        else:
            sql = f"SELECT {APPROVAL_COLUMNS} FROM approval_requests WHERE run_id = %s"
            for r in runs:
                cur.execute(sql, (r[0],))
                for _a in cur.fetchall():
                    touched += 1
        self.conn.commit()
        return len(runs), touched

    def close(self):
        self.conn.close()


class SqlAlchemyOnCmbagentDb(SqlAlchemy):
    """The same SQLAlchemy ORM and models on cmbagent_db's driver
    (cmbagent_db.sqlalchemy.create_engine): the driver's cost, the ORM held equal. The
    package's connections already run WAL, foreign keys on and synchronous=FULL."""

    name = "SQLAlchemy on cmbagent_db"

    def make_engine(self, db: Dict[str, Any]) -> Any:
        from cmbagent_db.sqlalchemy import create_engine

        if self.backend == "sqlite":
            return create_engine(f"sqlite:///{db['path']}")
        return create_engine(db["dsn"])


_APP_MODELS: Dict[str, Any] = {}


def app_models() -> Dict[str, Any]:
    """One of cmbagent's other models on cmbagent_db.sqlalchemy.Base, with relationships to
    the five as cmbagent declares them (declared once per process)."""
    if not _APP_MODELS:
        from sqlalchemy import Column, ForeignKey, Integer, String, Text
        from sqlalchemy.orm import relationship

        from cmbagent_db.sqlalchemy import Base

        class WorkflowStep(Base):
            __tablename__ = "workflow_steps"
            id = Column(String(36), primary_key=True)
            run_id = Column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"),
                            nullable=False)
            session_id = Column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"),
                                nullable=False)
            step_number = Column(Integer, nullable=False)
            goal = Column(Text)
            run = relationship("WorkflowRun", back_populates="workflow_steps")
            session = relationship("Session", back_populates="workflow_steps")

        _APP_MODELS["WorkflowStep"] = WorkflowStep
    return _APP_MODELS


class CmbagentDbInBridge(CmbagentDb):
    """cmbagent_db's five models, the same calls, in cmbagent_db.sqlalchemy sessions
    (sessionmaker over cmbagent_db.sqlalchemy.create_engine) whose Base also maps one of
    cmbagent's other models; the lookups run in a session holding one of its objects."""

    name = "cmbagent_db in a cmbagent_db.sqlalchemy session"

    def __init__(self, db: Dict[str, Any]) -> None:
        super().__init__(db)
        from cmbagent_db.sqlalchemy import Base, create_engine, sessionmaker

        self.Step = app_models()["WorkflowStep"]
        self.engine = create_engine(self.url)
        Base.metadata.create_all(self.engine)
        factory = sessionmaker(bind=self.engine, autocommit=False, autoflush=False,
                               expire_on_commit=False)
        self.get_db_session = lambda _url: factory()

    def warm(self) -> None:
        super().warm()
        db = self.get_db_session(self.url)
        try:
            if db.query(self.Step).first() is None:
                db.add(self.Step(id="bench-step", run_id=self.run_id,
                                 session_id=self.session_id, step_number=1))
                db.commit()
        finally:
            db.close()

    def lookup(self, ids):
        db = self.get_db_session(self.url)
        try:
            held = db.query(self.Step).first()
            assert held is not None
            return self.lookups(db, ids)
        finally:
            db.close()

    def close(self):
        super().close()
        self.engine.dispose()


def make_system(name: str, db: Dict[str, Any], **kw) -> System:
    if name == "cmbagent_db":
        return CmbagentDb(db, **kw)
    if name == "sqlalchemy":
        return SqlAlchemy(db)
    if name == "sqlalchemy_bridge":
        return SqlAlchemyOnCmbagentDb(db)
    if name == "cmbagent_db_in_bridge":
        return CmbagentDbInBridge(db)
    if name == "raw":
        return RawSqlite(db) if db["backend"] == "sqlite" else RawPsycopg2(db)
    raise ValueError(name)


# --------------------------------------------------------------------------------------
# Raw helpers used outside the timing (reset between sweeps, checks)
# --------------------------------------------------------------------------------------


class RawAdmin:
    """A separate raw connection to a benchmark database, for set-up and checks only."""

    def __init__(self, db: Dict[str, Any]) -> None:
        self.backend = db["backend"]
        if self.backend == "sqlite":
            import sqlite3

            self.conn = sqlite3.connect(db["path"], isolation_level=None)
            for p in SQLITE_PRAGMAS:
                self.conn.execute(p)
            self.ph = "?"
        else:
            import psycopg2

            self.conn = psycopg2.connect(db["dsn"])
            self.conn.autocommit = True
            self.ph = "%s"

    def fetch(self, sql: str, args=()) -> list:
        sql = sql.replace("?", self.ph)
        cur = self.conn.cursor()
        cur.execute(sql, args)
        return cur.fetchall()

    def execute(self, sql: str, args=()) -> None:
        cur = self.conn.cursor()
        cur.execute(sql.replace("?", self.ph), args)
        if self.backend == "sqlite":
            cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def now_param(self):
        return sqlite_ts(utcnow()) if self.backend == "sqlite" else utcnow()

    def overdue_ids(self) -> List[str]:
        return [r[0] for r in self.fetch(
            "SELECT id FROM approval_requests WHERE status = 'pending' AND expires_at < ?",
            (self.now_param(),))]

    def reset_sweep(self, ids: Sequence[str]) -> None:
        """Undo a sweep: the same rows pending again, and the database tidy, as before."""
        cur = self.conn.cursor()
        if self.backend == "sqlite":
            cur.execute("BEGIN IMMEDIATE")
            cur.executemany("UPDATE approval_requests SET status = 'pending' WHERE id = ?",
                            [(i,) for i in ids])
            cur.execute("COMMIT")
            cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            cur.execute("UPDATE approval_requests SET status = 'pending' WHERE id = ANY(%s)",
                        (list(ids),))
            cur.execute("VACUUM approval_requests")

    def close(self) -> None:
        self.conn.close()


def settle_wal(db: Dict[str, Any], timeout: float = 60.0) -> None:
    """Waits until the WAL of a SQLite database is fully checkpointed (nothing on PostgreSQL)."""
    if db["backend"] != "sqlite":
        return
    import sqlite3

    conn = sqlite3.connect(db["path"], timeout=timeout, isolation_level=None)
    try:
        deadline = time.monotonic() + timeout
        while True:
            # (busy, frames in the WAL, frames copied); busy while another checkpoint runs.
            busy, log, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if busy == 0 and log == copied:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the WAL of {db['path']} was not checkpointed in {timeout} s")
            time.sleep(0.001)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------
# Memory (peak RSS, so Rust allocations count too)
# --------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_kb() -> int:
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    return _status_kb("VmHWM")


# --------------------------------------------------------------------------------------
# The worker: one (system, workload) per process, driven repetition by repetition
# --------------------------------------------------------------------------------------
#
# The driver starts one worker per system, waits until all are READY (set up and warmed
# up), then asks them in turn, in rotating order, for one timed repetition each: on a
# shared machine whose load drifts, every system sees the same drift. Protocol, one line
# each way: driver sends the spec (JSON), worker answers READY; then REP -> "REP <secs>",
# END -> "RESULT <json>" (final checks done); any failure -> "ERROR <json message>".


def _timed(fn: Callable[[], Any]) -> "tuple[float, Any]":
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Runner:
    def __init__(self, spec: Dict[str, Any]) -> None:
        self.spec = spec
        self.workload: str = spec["workload"]
        self.dbs: List[Dict[str, Any]] = spec["dbs"]
        self.p: Dict[str, Any] = spec.get("params", {})
        self.system_name: str = spec["system"]
        self.kw = ({"heartbeat_path": self.p["heartbeat_path"]}
                   if "heartbeat_path" in self.p and self.system_name == "cmbagent_db" else {})
        self.reps = 0
        self.extra: Dict[str, Any] = {}
        self.sysm: Optional[System] = None
        self.admin: Optional[RawAdmin] = None
        # Time until the last write workload's call returned (see _settled).
        self.returned: Optional[float] = None

    # -- set-up and warm-up ------------------------------------------------------------
    def setup(self) -> None:
        w, p = self.workload, self.p
        if w == "bulk_insert":
            # A fresh database per repetition; dbs[0] is the warm-up's.
            self.contexts = [make_context(i) for i in range(int(p["rows"]))]
            self._bulk_rep(self.dbs[0])
            return
        db = self.dbs[0]
        self.sysm = make_system(self.system_name, db, **self.kw)
        self.sysm.warm()
        if self.system_name == "cmbagent_db" and w == "heartbeat":
            self.extra["path"] = self.sysm.heartbeat_label()  # type: ignore[attr-defined]
        if w == "create_commit":
            self.admin = RawAdmin(db)
            self.before = self._count()
            self.sysm.create_commit([make_context(-i) for i in range(1, 6)])
            self.written = 5
        elif w == "lookup":
            import random

            admin = RawAdmin(db)
            self.ids = [r[0] for r in admin.fetch("SELECT id FROM approval_requests ORDER BY id")]
            admin.close()
            self.rng = random.Random(1234)
            self._lookup_rep(200)
        elif w == "overdue":
            self._overdue_rep(1)
        elif w == "sweep":
            self.admin = RawAdmin(db)
            self.overdue_ids = self.admin.overdue_ids()
            if len(self.overdue_ids) != int(p["expected"]):
                raise RuntimeError(f"{len(self.overdue_ids)} overdue rows before the sweep, "
                                   f"expected {p['expected']}")
            self.admin.reset_sweep(self.overdue_ids)  # the same tidy state before every sweep
            self._sweep_rep()
        elif w == "heartbeat":
            self.admin = RawAdmin(db)
            self.task_ids = [f"task-{i:04d}" for i in range(int(p["connections"]))]
            stale = utcnow() - timedelta(days=1)
            self.stale = sqlite_ts(stale) if db["backend"] == "sqlite" else stale
            self._heartbeat_rep(self.task_ids[:10])
        elif w == "load_all":
            gc.collect()
        elif w == "relationship":
            self._relationship_rep()
        else:
            raise ValueError(f"unknown workload {w!r}")

    def _count(self) -> int:
        assert self.admin is not None
        return self.admin.fetch("SELECT count(*) FROM approval_requests")[0][0]

    def _settled(self, db: Dict[str, Any], fn: Callable[[], Any]) -> Any:
        """Runs a workload that writes and, on SQLite, waits until every page it committed to
        the WAL is in the database file; both inside the timing. Raw sqlite3 and SQLAlchemy
        copy the WAL inside the commit that grows it past 1,000 pages (SQLite's default);
        cmbagent_db leaves that to a background thread. Counting the copy on every side
        charges each system for all the work it caused, and it never runs during another
        system's repetition. The time until `fn` returned, what a caller waits for, is
        kept as well (`returned_secs`)."""
        t0 = time.perf_counter()
        out = fn()
        self.returned = time.perf_counter() - t0
        settle_wal(db)
        return out

    # -- one repetition of each workload -------------------------------------------------
    def _bulk_rep(self, db: Dict[str, Any]) -> float:
        sysm = make_system(self.system_name, db, **self.kw)
        sysm.warm()
        gc.collect()
        secs, n = _timed(lambda: self._settled(db, lambda: sysm.bulk_insert(self.contexts)))
        sysm.close()
        check = RawAdmin(db)
        count = check.fetch("SELECT count(*) FROM approval_requests")[0][0]
        check.close()
        if n != len(self.contexts) or count != len(self.contexts):
            raise RuntimeError(f"bulk insert wrote {count} rows, expected {len(self.contexts)}")
        return secs

    def _lookup_rep(self, n: int) -> float:
        picks = [self.ids[self.rng.randrange(len(self.ids))] for _ in range(n)]
        assert self.sysm is not None
        secs, found = _timed(lambda: self.sysm.lookup(picks))
        if found != n:
            raise RuntimeError(f"{found} of {n} lookups found their row")
        return secs

    def _overdue_rep(self, k: int) -> float:
        assert self.sysm is not None
        secs, n = _timed(lambda: self.sysm.overdue(k))
        if n != int(self.p["expected"]):
            raise RuntimeError(f"overdue query returned {n} rows, expected {self.p['expected']}")
        return secs / k

    def _sweep_rep(self) -> float:
        assert self.sysm is not None and self.admin is not None
        secs, n = _timed(lambda: self._settled(self.dbs[0], self.sysm.sweep))
        expected = int(self.p["expected"])
        if n != expected:
            raise RuntimeError(f"sweep matched {n} rows, expected {expected}")
        left = self.admin.fetch(
            "SELECT count(*) FROM approval_requests WHERE status = 'pending' AND expires_at < ?",
            (self.admin.now_param(),))[0][0]
        if left != 0:
            raise RuntimeError(f"{left} overdue rows left pending after the sweep")
        self.admin.reset_sweep(self.overdue_ids)
        return secs

    def _heartbeat_rep(self, task_ids: Sequence[str]) -> float:
        assert self.sysm is not None and self.admin is not None
        # Every row stale again (outside the timing), so the check below sees this
        # repetition's writes, whatever timestamp format the writer used.
        self.admin.execute("UPDATE active_connections SET last_heartbeat = ?", (self.stale,))
        secs, _ = _timed(lambda: self._settled(self.dbs[0], lambda: self.sysm.heartbeat(task_ids)))
        fresh = self.admin.fetch(
            "SELECT count(*) FROM active_connections WHERE last_heartbeat > ?", (self.stale,))[0][0]
        if fresh != len(task_ids):
            raise RuntimeError(f"{fresh} of {len(task_ids)} heartbeats were written")
        return secs

    def _relationship_rep(self) -> float:
        assert self.sysm is not None
        mode = self.p["mode"]
        secs, (runs, touched) = _timed(lambda: self.sysm.relationship_load(mode))
        want_runs = int(self.p["runs"])
        want = want_runs * int(self.p["per_run"])
        if runs != want_runs or touched != want:
            raise RuntimeError(f"relationship load gave {runs} runs and {touched} approvals, "
                               f"expected {want_runs} and {want}")
        return secs

    def _load_rep(self) -> float:
        # One measured load per process: a fresh process is the honest memory baseline.
        assert self.sysm is not None
        if self.reps > 0:
            raise RuntimeError("load_all measures once per process")
        gc.collect()
        self.extra["hwm_reset"] = reset_peak_rss()
        base = rss_kb()
        secs, rows = _timed(self.sysm.load_all)
        peak = peak_rss_kb()
        if len(rows) != int(self.p["expected"]):
            raise RuntimeError(f".all() returned {len(rows)} rows, expected {self.p['expected']}")
        self.extra.update(rss_base_kb=base, peak_delta_kb=peak - base, retained_kb=rss_kb() - base)
        del rows
        return secs

    def rep(self) -> float:
        w, p = self.workload, self.p
        self.returned = None
        if w == "bulk_insert":
            secs = self._bulk_rep(self.dbs[self.reps + 1])
        elif w == "create_commit":
            assert self.sysm is not None
            n = int(p["n"])
            contexts = [make_context(self.reps * n + i) for i in range(n)]
            secs, _ = _timed(lambda: self._settled(
                self.dbs[0], lambda: self.sysm.create_commit(contexts)))
            self.written += n
        elif w == "lookup":
            secs = self._lookup_rep(int(p["n"]))
        elif w == "overdue":
            secs = self._overdue_rep(int(p["k"]))
        elif w == "sweep":
            secs = self._sweep_rep()
        elif w == "heartbeat":
            secs = self._heartbeat_rep(self.task_ids)
        elif w == "load_all":
            secs = self._load_rep()
        elif w == "relationship":
            secs = self._relationship_rep()
        else:
            raise ValueError(w)
        if self.returned is not None and self.dbs[0]["backend"] == "sqlite":
            self.extra.setdefault("returned_secs", []).append(self.returned)
        self.reps += 1
        return secs

    def finish(self) -> Dict[str, Any]:
        if self.workload == "create_commit":
            got = self._count() - self.before
            if got != self.written:
                raise RuntimeError(f"{got} approvals committed, expected {self.written}")
        if self.sysm is not None:
            self.sysm.close()
        if self.admin is not None:
            self.admin.close()
        return dict(self.extra, reps=self.reps)


def worker_main() -> int:
    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        runner = Runner(json.loads(sys.stdin.readline()))
        runner.setup()
        say("READY")
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "REP":
                gc.collect()
                say(f"REP {runner.rep()!r}")
            elif cmd == "END":
                say("RESULT " + json.dumps(runner.finish()))
                return 0
            else:
                raise ValueError(f"unknown command {cmd!r}")
        return 0
    except Exception as exc:
        import traceback

        traceback.print_exc()
        say("ERROR " + json.dumps(f"{type(exc).__name__}: {exc}"))
        return 1

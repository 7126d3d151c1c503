"""Databases as cmbagent itself makes them, to test that cmbagent_db opens them.

Three kinds, each built with SQLAlchemy (and, for the third, Alembic's operations) the way
cmbagent does, on SQLite or PostgreSQL:

- ``legacy``: cmbagent before durable approvals. ``create_all`` of its models then: the
  first ``approval_requests`` (a step's approval: ``step_id`` and ``requested_at`` NOT NULL,
  ``status`` holding the decision), no ``active_connections``, no task-stage columns.
- ``current``: ``create_all`` of cmbagent's models today: all five tables in today's shape,
  with the legacy approval columns and the task-stage columns.
- ``chain``: the legacy database migrated by cmbagent's own Alembic revisions
  ``e5f6a7b8c9d0`` (alters approval_requests, adds active_connections) and, up to
  ``b8c9d0e1f2a3``, the task-stage columns; ``alembic_version`` holds that revision.

Each also holds some of cmbagent's other tables (projects, workflow_steps, dag_nodes,
cost_records, task_stages) with foreign keys into the five, and rows in all of them:
``fill`` writes a known set and returns what it wrote.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Dict, List

from sqlalchemy import (
    JSON,
    TIMESTAMP,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    func,
    insert,
)
from sqlalchemy.pool import NullPool

from helpers import sa_url

CMBAGENT_HEAD = "b8c9d0e1f2a3"
BEFORE_APPROVALS = "d4e5f6a7b8c9"
APPROVALS_REVISION = "e5f6a7b8c9d0"

LEGACY_STATUSES = ["pending", "approved", "rejected", "modified"]
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456)


def _sessions(md: MetaData) -> Table:
    return Table(
        "sessions", md,
        Column("id", String(36), primary_key=True),
        Column("user_id", String(36), nullable=True, index=True),
        Column("name", String(255), nullable=False),
        Column("created_at", TIMESTAMP, nullable=False),
        Column("last_active_at", TIMESTAMP, nullable=False),
        Column("status", String(50), nullable=False, index=True),
        Column("meta", JSON),
        Column("resource_limits", JSON),
        Index("idx_sessions_user_status", "user_id", "status"),
    )


def _projects(md: MetaData) -> Table:
    return Table(
        "projects", md,
        Column("id", String(36), primary_key=True),
        Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("name", String(255), nullable=False),
    )


def _workflow_runs(md: MetaData, *, task_stages: bool) -> Table:
    extra = []
    if task_stages:
        extra = [
            Column("parent_run_id", String(36),
                   ForeignKey("workflow_runs.id", ondelete="SET NULL"), index=True),
            Column("stage_number", Integer),
            Column("stage_name", String(100)),
        ]
    return Table(
        "workflow_runs", md,
        Column("id", String(36), primary_key=True),
        Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("project_id", String(36), ForeignKey("projects.id", ondelete="SET NULL")),
        Column("mode", String(50), nullable=False, index=True),
        Column("agent", String(100), nullable=False, index=True),
        Column("model", String(100), nullable=False),
        Column("status", String(50), nullable=False, index=True),
        Column("started_at", TIMESTAMP),
        Column("completed_at", TIMESTAMP),
        Column("last_heartbeat_at", TIMESTAMP),
        Column("checkpoint_frequency_minutes", Integer, nullable=False),
        Column("task_description", Text),
        Column("meta", JSON),
        Column("branch_parent_id", String(36),
               ForeignKey("workflow_runs.id", ondelete="SET NULL"), index=True),
        Column("is_branch", Boolean, nullable=False),
        Column("branch_depth", Integer, nullable=False),
        *extra,
        Index("idx_workflow_runs_session_status", "session_id", "status"),
        Index("idx_workflow_runs_agent_status", "agent", "status"),
    )


def _workflow_steps(md: MetaData) -> Table:
    return Table(
        "workflow_steps", md,
        Column("id", String(36), primary_key=True),
        Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("step_number", Integer, nullable=False),
        Column("goal", Text),
    )


def _session_states(md: MetaData) -> Table:
    return Table(
        "session_states", md,
        Column("id", String(36), primary_key=True),
        Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("mode", String(50), nullable=False),
        Column("conversation_history", JSON),
        Column("context_variables", JSON),
        Column("plan_data", JSON),
        Column("current_phase", String(50)),
        Column("current_step", Integer),
        Column("status", String(20), index=True),
        Column("created_at", TIMESTAMP(timezone=True), server_default=func.now()),
        Column("updated_at", TIMESTAMP(timezone=True), server_default=func.now()),
        Column("expires_at", TIMESTAMP(timezone=True)),
        Column("version", Integer),
        Index("idx_session_states_session_status", "session_id", "status"),
        Index("idx_session_states_mode", "mode"),
        Index("idx_session_states_updated", "updated_at"),
    )


def _others(md: MetaData, *, task_stages: bool) -> None:
    Table(
        "dag_nodes", md,
        Column("id", String(36), primary_key=True),
        Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("node_type", String(50), nullable=False),
    )
    Table(
        "cost_records", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"),
               index=True),
        Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("cost_usd", Integer, nullable=False),
    )
    if task_stages:
        Table(
            "task_stages", md,
            Column("id", String(36), primary_key=True),
            Column("parent_run_id", String(36),
                   ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False),
            Column("child_run_id", String(36),
                   ForeignKey("workflow_runs.id", ondelete="SET NULL")),
            Column("stage_number", Integer, nullable=False),
            Column("stage_name", String(100), nullable=False),
        )


def _legacy_approvals(md: MetaData) -> Table:
    return Table(
        "approval_requests", md,
        Column("id", String(36), primary_key=True),
        Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("status", String(50), nullable=False, index=True),
        Column("requested_at", TIMESTAMP, nullable=False),
        Column("resolved_at", TIMESTAMP),
        Column("context_snapshot", JSON),
        Column("user_feedback", Text),
        Column("resolution", String(50)),
        Index("idx_approval_requests_run_requested", "run_id", "requested_at"),
        Index("idx_approval_requests_status", "status"),
    )


def _current_approvals(md: MetaData) -> None:
    Table(
        "approval_requests", md,
        Column("id", String(36), primary_key=True),
        Column("run_id", String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"),
               nullable=False, index=True),
        Column("session_id", String(36), ForeignKey("sessions.id", ondelete="SET NULL"),
               index=True),
        Column("step_id", String(36), ForeignKey("workflow_steps.id", ondelete="CASCADE"),
               index=True),
        Column("approval_type", String(50), nullable=False),
        Column("context", JSON, nullable=False),
        Column("status", String(20), index=True),
        Column("resolution", String(20)),
        Column("result", JSON),
        Column("created_at", TIMESTAMP(timezone=True), server_default=func.now()),
        Column("expires_at", TIMESTAMP(timezone=True), nullable=False),
        Column("resolved_at", TIMESTAMP(timezone=True)),
        Column("requested_at", TIMESTAMP),
        Column("context_snapshot", JSON),
        Column("user_feedback", Text),
        Index("idx_approval_run_status", "run_id", "status"),
        Index("idx_approval_expires", "expires_at"),
        Index("idx_approval_session", "session_id"),
        Index("idx_approval_status", "status"),
    )
    Table(
        "active_connections", md,
        Column("id", String(36), primary_key=True),
        Column("task_id", String(100), nullable=False, unique=True, index=True),
        Column("session_id", String(36), ForeignKey("sessions.id", ondelete="SET NULL")),
        Column("server_instance", String(100)),
        Column("connected_at", TIMESTAMP(timezone=True), server_default=func.now()),
        Column("last_heartbeat", TIMESTAMP(timezone=True), server_default=func.now()),
        Index("idx_connection_task_id", "task_id"),
        Index("idx_connection_heartbeat", "last_heartbeat"),
        Index("idx_connection_session", "session_id"),
    )


def legacy_metadata() -> MetaData:
    md = MetaData()
    _sessions(md)
    _projects(md)
    _workflow_runs(md, task_stages=False)
    _workflow_steps(md)
    _session_states(md)
    _legacy_approvals(md)
    _others(md, task_stages=False)
    return md


def current_metadata() -> MetaData:
    md = MetaData()
    _sessions(md)
    _projects(md)
    _workflow_runs(md, task_stages=True)
    _workflow_steps(md)
    _session_states(md)
    _current_approvals(md)
    _others(md, task_stages=True)
    return md


def engine(url: str):
    e = create_engine(sa_url(url), poolclass=NullPool)
    if url.startswith("sqlite"):
        from sqlalchemy import event

        @event.listens_for(e, "connect")
        def _fk(dbapi_conn, _record):  # cmbagent turns foreign keys on
            dbapi_conn.execute("PRAGMA foreign_keys=ON")

    return e


def set_alembic_version(url: str, revision: str) -> None:
    with engine(url).begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32) NOT NULL, "
            "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
        )
        conn.exec_driver_sql("DELETE FROM alembic_version")
        conn.exec_driver_sql(f"INSERT INTO alembic_version (version_num) VALUES ('{revision}')")


def _chain_approvals(conn) -> None:
    """What cmbagent's revision e5f6a7b8c9d0 does: alter approval_requests in a batch (new
    columns nullable, legacy ones made nullable), add active_connections."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    op = Operations(MigrationContext.configure(conn))
    with op.batch_alter_table("approval_requests") as b:
        b.add_column(Column("session_id", String(36), nullable=True))
        b.add_column(Column("approval_type", String(50), nullable=True))
        b.add_column(Column("context", JSON, nullable=True))
        b.add_column(Column("result", JSON, nullable=True))
        b.add_column(Column("created_at", TIMESTAMP(timezone=True), server_default=func.now()))
        b.add_column(Column("expires_at", TIMESTAMP(timezone=True), nullable=True))
        for legacy in ("step_id", "requested_at"):
            b.alter_column(legacy, nullable=True, existing_type=String(36)
                           if legacy == "step_id" else TIMESTAMP)
        b.create_index("idx_approval_run_status", ["run_id", "status"])
        b.create_index("idx_approval_expires", ["expires_at"])
        b.create_index("idx_approval_session", ["session_id"])
        b.create_foreign_key("fk_approval_session", "sessions", ["session_id"], ["id"],
                             ondelete="SET NULL")
    op.create_table(
        "active_connections",
        Column("id", String(36), primary_key=True),
        Column("task_id", String(100), nullable=False, unique=True),
        Column("session_id", String(36), ForeignKey("sessions.id", ondelete="SET NULL")),
        Column("server_instance", String(100)),
        Column("connected_at", TIMESTAMP(timezone=True), server_default=func.now()),
        Column("last_heartbeat", TIMESTAMP(timezone=True), server_default=func.now()),
    )
    op.create_index("idx_connection_task_id", "active_connections", ["task_id"])
    op.create_index("idx_connection_session_id", "active_connections", ["session_id"])
    op.create_index("idx_connection_heartbeat", "active_connections", ["last_heartbeat"])


def _chain_task_stages(conn) -> None:
    """What cmbagent's revision b8c9d0e1f2a3 does to workflow_runs."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    op = Operations(MigrationContext.configure(conn))
    # Alembic cannot add a column with a foreign key to a SQLite table in place; there
    # the same change runs as a batch.
    with op.batch_alter_table("workflow_runs") as b:
        b.add_column(Column("parent_run_id", String(36)))
        b.add_column(Column("stage_number", Integer))
        b.add_column(Column("stage_name", String(100)))
        b.create_foreign_key("fk_workflow_runs_parent_run", "workflow_runs",
                             ["parent_run_id"], ["id"], ondelete="SET NULL")
        b.create_index("idx_workflow_runs_parent_run", ["parent_run_id"])


def build(url: str, kind: str) -> Dict[str, Any]:
    """Makes a ``kind`` database at ``url`` with rows; returns what ``fill`` wrote."""
    e = engine(url)
    try:
        if kind == "current":
            current_metadata().create_all(e)
            written = fill(e, legacy=False)
        else:
            legacy_metadata().create_all(e)
            written = fill(e, legacy=True)
            if kind == "chain":
                # Batch mode copies and drops tables: with foreign keys on, dropping
                # workflow_runs would cascade into its children (Alembic's advice).
                plain = create_engine(sa_url(url), poolclass=NullPool)
                with plain.begin() as conn:
                    _chain_approvals(conn)
                    _chain_task_stages(conn)
                plain.dispose()
                set_alembic_version(url, CMBAGENT_HEAD)
            elif kind != "legacy":
                raise ValueError(kind)
        return written
    finally:
        e.dispose()


def fill(e, *, legacy: bool) -> Dict[str, Any]:
    """A session, a project, two runs, a step, cmbagent's other rows, and approvals: in
    every legacy status for a legacy table, else in today's form."""
    md = MetaData()
    md.reflect(e)
    t = md.tables
    approvals: List[Dict[str, Any]] = []
    with e.begin() as conn:
        conn.execute(insert(t["sessions"]), [dict(
            id="s1", user_id="u1", name="research", created_at=T0, last_active_at=T0,
            status="active", meta={"k": [1, 2]}, resource_limits=None)])
        conn.execute(insert(t["projects"]), [dict(id="p1", session_id="s1", name="p")])
        runs = [
            dict(id="r1", session_id="s1", project_id="p1", mode="planning_control",
                 agent="engineer", model="gpt-4o", status="completed", started_at=T0,
                 checkpoint_frequency_minutes=10, task_description="task", meta={"a": 1},
                 branch_parent_id=None, is_branch=False, branch_depth=0),
            dict(id="r2", session_id="s1", project_id=None, mode="one_shot",
                 agent="researcher", model="gpt-4o", status="executing", started_at=T0,
                 checkpoint_frequency_minutes=5, task_description=None, meta=None,
                 branch_parent_id="r1", is_branch=True, branch_depth=1),
        ]
        if not legacy:
            runs[1].update(parent_run_id="r1", stage_number=2, stage_name="planning")
            runs[0].update(parent_run_id=None, stage_number=None, stage_name=None)
        conn.execute(insert(t["workflow_runs"]), runs)
        conn.execute(insert(t["workflow_steps"]), [
            dict(id="st1", run_id="r1", session_id="s1", step_number=1, goal="g")])
        conn.execute(insert(t["session_states"]), [dict(
            id="ss1", session_id="s1", mode="copilot", conversation_history=[{"m": 1}],
            context_variables={}, plan_data=None, current_phase="init", current_step=1,
            status="active", version=1)])
        conn.execute(insert(t["dag_nodes"]), [
            dict(id="n1", run_id="r1", session_id="s1", node_type="agent")])
        conn.execute(insert(t["cost_records"]), [
            dict(run_id="r1", step_id="st1", session_id="s1", cost_usd=3)])
        if legacy:
            for i, status in enumerate(LEGACY_STATUSES):
                approvals.append(dict(
                    id=f"legacy-{status}", run_id="r1", step_id="st1", status=status,
                    requested_at=T0 + timedelta(minutes=i),
                    resolved_at=None if status == "pending" else T0 + timedelta(hours=1),
                    context_snapshot=None if status == "rejected" else {"plan": [status, i]},
                    user_feedback=None if status == "pending" else f"feedback {i}",
                    resolution=None if status == "pending" else status))
        else:
            approvals.append(dict(
                id="today-pending", run_id="r1", session_id="s1", step_id="st1",
                approval_type="plan_approval", context={"plan": "p"}, status="pending",
                resolution=None, result=None, expires_at=datetime(2099, 1, 1),
                resolved_at=None))
            approvals.append(dict(
                id="today-resolved", run_id="r2", session_id="s1", step_id=None,
                approval_type="tool_call", context={"tool": "x"}, status="resolved",
                resolution="approved", result={"ok": True},
                expires_at=datetime(2025, 1, 1), resolved_at=T0))
            conn.execute(insert(t["active_connections"]), [dict(
                id="c1", task_id="task-1", session_id="s1", server_instance="i1")])
            conn.execute(insert(t["task_stages"]), [dict(
                id="ts1", parent_run_id="r1", child_run_id="r2", stage_number=2,
                stage_name="planning")])
        conn.execute(insert(t["approval_requests"]), approvals)
    with e.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM approval_requests").scalar() == len(approvals)
    return {"approvals": approvals}

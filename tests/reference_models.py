"""cmbagent's SQLAlchemy models, as cmbagent declares them today.

This is the anchor cmbagent_db replaces: the interoperability tests write rows
with these models and read them with cmbagent_db (and the other way round), and
the benchmarks measure cmbagent_db against them.  Test-only; it has its own
``Base`` and never touches cmbagent_db.

``Session``, ``WorkflowRun`` and ``SessionState`` follow spec/SCHEMA.md.
``ApprovalRequest`` and ``ActiveConnection`` are the seed's Task 1 and Task 2
code as written, duplicated indexes included, because that is what cmbagent
would run with; like cmbagent's models today, ``WorkflowRun`` carries the task
hierarchy and ``ApprovalRequest`` the columns of cmbagent's first approval table.
"""

import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy import (
    JSON,
    TIMESTAMP,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import declarative_base, relationship

Base = declarative_base()


def _new_id() -> str:
    return str(uuid.uuid4())


def _utcnow() -> datetime:
    """Naive UTC now, what ``datetime.utcnow`` gives (without its deprecation)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Session(Base):
    __tablename__ = "sessions"

    id = Column(String(36), primary_key=True, default=_new_id)
    user_id = Column(String(36), nullable=True, index=True)
    name = Column(String(255), nullable=False)
    created_at = Column(TIMESTAMP, nullable=False, default=_utcnow)
    last_active_at = Column(TIMESTAMP, nullable=False, default=_utcnow, onupdate=_utcnow)
    status = Column(String(50), nullable=False, default="active", index=True)
    meta = Column(JSON, nullable=True)
    resource_limits = Column(JSON, nullable=True)

    workflow_runs = relationship(
        "WorkflowRun", back_populates="session", cascade="all, delete-orphan"
    )
    session_states = relationship(
        "SessionState", back_populates="session", cascade="all, delete-orphan"
    )
    # Seed, Task 1: "In Session class, add:"
    approval_requests = relationship("ApprovalRequest", back_populates="session")

    __table_args__ = (Index("idx_sessions_user_status", "user_id", "status"),)


class WorkflowRun(Base):
    __tablename__ = "workflow_runs"

    id = Column(String(36), primary_key=True, default=_new_id)
    session_id = Column(
        String(36),
        ForeignKey("sessions.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    )
    project_id = Column(String(36), nullable=True)
    mode = Column(String(50), nullable=False, default="one_shot", index=True)
    agent = Column(String(100), nullable=False, default="engineer", index=True)
    model = Column(String(100), nullable=False, default="gpt-4o")
    status = Column(String(50), nullable=False, default="draft", index=True)
    started_at = Column(TIMESTAMP, nullable=True)
    completed_at = Column(TIMESTAMP, nullable=True)
    last_heartbeat_at = Column(TIMESTAMP, nullable=True)
    checkpoint_frequency_minutes = Column(Integer, nullable=False, default=10)
    task_description = Column(Text, nullable=True)
    meta = Column(JSON, nullable=True)
    branch_parent_id = Column(
        String(36),
        ForeignKey("workflow_runs.id", ondelete="SET NULL"),
        nullable=True,
        index=True,
    )
    is_branch = Column(Boolean, nullable=False, default=False)
    branch_depth = Column(Integer, nullable=False, default=0)
    # cmbagent's task hierarchy.
    parent_run_id = Column(
        String(36),
        ForeignKey("workflow_runs.id", ondelete="SET NULL"),
        nullable=True,
        index=True,
    )
    stage_number = Column(Integer, nullable=True)
    stage_name = Column(String(100), nullable=True)

    session = relationship("Session", back_populates="workflow_runs")
    # Seed, Task 1: "In WorkflowRun class, add:"
    approval_requests = relationship(
        "ApprovalRequest", back_populates="workflow_run", cascade="all, delete-orphan"
    )

    __table_args__ = (
        Index("idx_workflow_runs_session_status", "session_id", "status"),
        Index("idx_workflow_runs_agent_status", "agent", "status"),
    )


class SessionState(Base):
    """Stage 1: resumable state of a session."""

    __tablename__ = "session_states"

    id = Column(String(36), primary_key=True, default=_new_id)
    session_id = Column(
        String(36),
        ForeignKey("sessions.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    )
    mode = Column(String(50), nullable=False, index=True)
    conversation_history = Column(JSON, nullable=True)
    context_variables = Column(JSON, nullable=True)
    plan_data = Column(JSON, nullable=True)
    current_phase = Column(String(50), nullable=True)
    current_step = Column(Integer, nullable=True)
    status = Column(String(20), nullable=True, default="active", index=True)
    created_at = Column(TIMESTAMP(timezone=True), server_default=func.now())
    updated_at = Column(
        TIMESTAMP(timezone=True),
        server_default=func.now(),
        onupdate=func.now(),
        index=True,
    )
    expires_at = Column(TIMESTAMP(timezone=True), nullable=True)
    version = Column(Integer, nullable=True, default=1)

    session = relationship("Session", back_populates="session_states")

    __table_args__ = (Index("idx_session_states_session_status", "session_id", "status"),)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "session_id": self.session_id,
            "mode": self.mode,
            "conversation_history": self.conversation_history or [],
            "context_variables": self.context_variables or {},
            "plan_data": self.plan_data,
            "current_phase": self.current_phase,
            "current_step": self.current_step,
            "status": self.status,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "version": self.version,
        }

    @classmethod
    def create_for_session(cls, session_id: str, mode: str, **kwargs):
        return cls(
            session_id=session_id,
            mode=mode,
            conversation_history=kwargs.get("conversation_history", []),
            context_variables=kwargs.get("context_variables", {}),
            plan_data=kwargs.get("plan_data"),
            current_phase=kwargs.get("current_phase", "init"),
            status="active",
        )


# --- Seed, Task 1, as written -------------------------------------------------


class ApprovalRequest(Base):
    """Persistent approval request for HITL workflows"""
    __tablename__ = "approval_requests"

    id = Column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    run_id = Column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False, index=True)
    session_id = Column(String(36), ForeignKey("sessions.id", ondelete="SET NULL"), nullable=True, index=True)

    # Request details
    approval_type = Column(String(50), nullable=False)  # plan_approval, step_approval, error_recovery, tool_call
    context = Column(JSON, nullable=False)              # What's being approved (serialized)

    # Resolution
    status = Column(String(20), default="pending", index=True)  # pending, resolved, expired, cancelled
    resolution = Column(String(20), nullable=True)              # approved, rejected, modified
    result = Column(JSON, nullable=True)                        # Resolution details

    # Timing
    created_at = Column(TIMESTAMP(timezone=True), server_default=func.now())
    expires_at = Column(TIMESTAMP(timezone=True), nullable=False)
    resolved_at = Column(TIMESTAMP(timezone=True), nullable=True)

    # cmbagent's legacy columns (its step foreign key needs workflow_steps, not here).
    step_id = Column(String(36), nullable=True, index=True)
    requested_at = Column(TIMESTAMP, nullable=True)
    context_snapshot = Column(JSON, nullable=True)
    user_feedback = Column(Text, nullable=True)

    # Relationships
    workflow_run = relationship("WorkflowRun", back_populates="approval_requests")
    session = relationship("Session", back_populates="approval_requests")

    # Indexes for efficient timeout queries
    __table_args__ = (
        Index("idx_approval_run_status", "run_id", "status"),
        Index("idx_approval_expires_pending", "expires_at", postgresql_where=text("status = 'pending'")),
        Index("idx_approval_session", "session_id"),
    )

    def to_dict(self) -> dict:
        """Convert to dictionary for API responses"""
        return {
            "id": self.id,
            "run_id": self.run_id,
            "session_id": self.session_id,
            "step_id": self.step_id,
            "approval_type": self.approval_type,
            "context": self.context,
            "status": self.status,
            "resolution": self.resolution,
            "result": self.result,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
        }

    @classmethod
    def create_pending(cls, run_id: str, approval_type: str, context: dict,
                       timeout_seconds: int = 300, session_id: str = None, step_id: str = None):
        """Factory method to create a pending approval request"""
        return cls(
            run_id=run_id,
            session_id=session_id,
            step_id=step_id,
            approval_type=approval_type,
            context=context,
            status="pending",
            expires_at=datetime.now(timezone.utc) + timedelta(seconds=timeout_seconds),
        )


# --- Seed, Task 2, as written -------------------------------------------------


class ActiveConnection(Base):
    """Track active WebSocket connections for multi-instance deployment"""
    __tablename__ = "active_connections"

    id = Column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    task_id = Column(String(100), nullable=False, unique=True, index=True)
    session_id = Column(String(36), ForeignKey("sessions.id", ondelete="SET NULL"), nullable=True)

    # Server instance tracking (for routing in multi-instance setup)
    server_instance = Column(String(100), nullable=True)  # hostname or instance ID

    # Timing
    connected_at = Column(TIMESTAMP(timezone=True), server_default=func.now())
    last_heartbeat = Column(TIMESTAMP(timezone=True), server_default=func.now())

    # Indexes
    __table_args__ = (
        Index("idx_connection_heartbeat", "last_heartbeat"),
        Index("idx_connection_session", "session_id"),
    )

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "task_id": self.task_id,
            "session_id": self.session_id,
            "server_instance": self.server_instance,
            "connected_at": self.connected_at.isoformat() if self.connected_at else None,
            "last_heartbeat": self.last_heartbeat.isoformat() if self.last_heartbeat else None,
        }


ALL_MODELS = (Session, WorkflowRun, SessionState, ApprovalRequest, ActiveConnection)

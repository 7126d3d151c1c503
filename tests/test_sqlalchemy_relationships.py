"""Relationships between SQLAlchemy models on ``cmbagent_db.sqlalchemy.Base`` and the five:
``relationship("WorkflowRun")`` / ``relationship("Session")`` with ``back_populates`` as
cmbagent declares them, the names appearing on this package's objects, and a flush that
writes both kinds in foreign-key order in both directions (a project before the run naming
it, the run before its steps, a step before the approval naming it), on a database cmbagent
made (whose foreign keys from the five into its own tables are real constraints).
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from sqlalchemy import Column, ForeignKey, Integer, String, Text
from sqlalchemy.orm import relationship
from sqlalchemy.orm.exc import DetachedInstanceError

import cmbagent_databases as cmb
from cmbagent_db.models import ApprovalRequest, Session, WorkflowRun
from cmbagent_db.sqlalchemy import Base, create_engine, sessionmaker

from helpers import fetch_all


def _id() -> str:
    return str(uuid.uuid4())


class Project(Base):
    __tablename__ = "projects"
    id = Column(String(36), primary_key=True, default=_id)
    session_id = Column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"),
                        nullable=False)
    name = Column(String(255), nullable=False)

    session = relationship("Session", back_populates="projects")
    workflow_runs = relationship("WorkflowRun", back_populates="project")


class WorkflowStep(Base):
    __tablename__ = "workflow_steps"
    id = Column(String(36), primary_key=True, default=_id)
    run_id = Column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"),
                    nullable=False)
    session_id = Column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"),
                        nullable=False)
    step_number = Column(Integer, nullable=False)
    goal = Column(Text)

    run = relationship("WorkflowRun", back_populates="workflow_steps")
    session = relationship("Session", back_populates="workflow_steps")
    approval_requests = relationship("ApprovalRequest", back_populates="step")


class DAGNode(Base):
    """Declared with ``backref`` instead of ``back_populates``."""

    __tablename__ = "dag_nodes"
    id = Column(String(36), primary_key=True, default=_id)
    run_id = Column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"),
                    nullable=False)
    session_id = Column(String(36), ForeignKey("sessions.id", ondelete="CASCADE"),
                        nullable=False)
    node_type = Column(String(50), nullable=False)

    run = relationship("WorkflowRun", backref="dag_nodes")


@pytest.fixture
def factory(db_url):
    """cmbagent's own database (made by its models, with rows), opened through the
    bridge: ``create_all`` brings the five to head and leaves cmbagent's tables as they are."""
    cmb.build(db_url, "current")
    engine = create_engine(db_url)
    Base.metadata.create_all(engine)
    yield sessionmaker(bind=engine, autocommit=False, autoflush=False, expire_on_commit=False)
    engine.dispose()


def new_run(db, **kw) -> WorkflowRun:
    chat = Session(name="chat")
    db.add(chat)
    run = WorkflowRun(session_id=chat.id, status="executing", **kw)
    db.add(run)
    return run


def test_back_populates_names_appear_on_the_five(factory):
    with factory() as db:
        run = new_run(db)
        step = WorkflowStep(run=run, session_id=run.session_id, step_number=1, goal="plan")
        db.add(step)
        assert step.run is run and step.run_id == run.id
        assert run.workflow_steps == [step]  # pending, before any flush
        db.commit()
        run_id, step_id, chat_id = run.id, step.id, run.session_id

    with factory() as db:
        step = db.get(WorkflowStep, step_id)
        assert isinstance(step.run, WorkflowRun) and step.run.id == run_id
        assert step.run is db.get(WorkflowRun, run_id)  # the session's own object
        assert step.session.id == chat_id
        run = db.get(WorkflowRun, run_id)
        assert [s.id for s in run.workflow_steps] == [step_id]
        assert [s.id for s in db.get(Session, chat_id).workflow_steps] == [step_id]
        # Class attributes stay SQLAlchemy's: joins along the relationship work.
        found = (db.query(WorkflowStep).join(WorkflowStep.run)
                 .filter(WorkflowRun.status == "executing", WorkflowRun.id == run_id).all())
        assert [s.id for s in found] == [step_id]


def test_a_backref_appears_on_the_five_too(factory):
    with factory() as db:
        run = new_run(db)
        node = DAGNode(session_id=run.session_id, node_type="agent")
        run.dag_nodes.append(node)
        assert node.run is run and node in db
        db.commit()
        run_id = run.id
    with factory() as db:
        assert [n.node_type for n in db.get(WorkflowRun, run_id).dag_nodes] == ["agent"]


def test_one_flush_orders_both_kinds_in_both_directions(factory, db_url):
    """project (theirs) -> run (ours) -> step (theirs) -> approval (ours): every parent gets
    its id from its own insert, so each key is set between the steps of the flush, and the
    database's real foreign keys check the order."""
    with factory() as db:
        chat = Session(name="chat")
        db.add(chat)
        db.flush()
        project = Project(session_id=chat.id, name="p")
        run = WorkflowRun(session_id=chat.id, status="executing", project=project)
        step = WorkflowStep(run=run, session_id=chat.id, step_number=1)
        approval = ApprovalRequest.create_pending(run_id=run.id, approval_type="step_approval",
                                                  context={"n": 1})
        approval.step = step
        db.add_all([approval, step, run, project])  # any order
        assert project.id is None and run.project_id is None
        db.commit()
        assert run.project_id == project.id and approval.step_id == step.id
        assert run.project is project and approval.step is step
        ids = project.id, run.id, step.id, approval.id

    assert fetch_all(db_url, "SELECT project_id FROM workflow_runs WHERE id = ?",
                     (ids[1],)) == [(ids[0],)]
    assert fetch_all(db_url, "SELECT run_id FROM workflow_steps WHERE id = ?",
                     (ids[2],)) == [(ids[1],)]
    assert fetch_all(db_url, "SELECT step_id FROM approval_requests WHERE id = ?",
                     (ids[3],)) == [(ids[2],)]
    with factory() as db:
        assert [r.id for r in db.get(Project, ids[0]).workflow_runs] == [ids[1]]
        assert [a.id for a in db.get(WorkflowStep, ids[2]).approval_requests] == [ids[3]]


def test_keys_given_directly_are_written_in_order_too(factory, db_url):
    """Ids chosen up front and keys assigned as columns: nothing to fill in between, so
    only the order of the inserts keeps the database's foreign keys satisfied."""
    with factory() as db:
        chat = Session(name="chat")
        project = Project(id=_id(), session_id=chat.id, name="p")
        run = WorkflowRun(session_id=chat.id, status="executing", project_id=project.id)
        step = WorkflowStep(id=_id(), run_id=run.id, session_id=chat.id, step_number=1)
        approval = ApprovalRequest.create_pending(run_id=run.id, approval_type="step_approval",
                                                  context={}, step_id=step.id)
        db.add_all([approval, step, run, project, chat])
        db.flush()
        assert run.project_id == project.id and approval.step_id == step.id
        db.commit()
    assert fetch_all(db_url, "SELECT step_id FROM approval_requests WHERE id = ?",
                     (approval.id,)) == [(step.id,)]


def test_the_databases_foreign_keys_hold_the_order(factory):
    """The same rows written in the opposite order are refused by the database: the order
    above is the flush's doing."""
    import cmbagent_db.exceptions as exc

    with factory() as db:
        run = new_run(db)
        db.commit()
        approval = ApprovalRequest.create_pending(run_id=run.id, approval_type="x",
                                                  context={}, step_id=_id())
        db.add(approval)
        with pytest.raises(exc.IntegrityError):
            db.commit()
        db.rollback()
        assert db.query(ApprovalRequest).filter(ApprovalRequest.run_id == run.id).count() == 0


def test_collections_set_the_childs_key_and_rollback_takes_both(factory, db_url):
    with factory() as db:
        run = new_run(db)
        step = WorkflowStep(session_id=run.session_id, step_number=1)
        run.workflow_steps.append(step)
        assert step in db and step.run is run
        db.flush()
        assert step.run_id == run.id
        assert fetch_all(db_url, "SELECT count(*) FROM workflow_steps WHERE id = ?",
                         (step.id,)) == [(0,)]  # not committed: another connection sees none
        db.rollback()
        assert db.query(WorkflowRun).filter(WorkflowRun.id == run.id).count() == 0
        assert db.query(WorkflowStep).filter(WorkflowStep.run_id == run.id).count() == 0
        # The session goes on.
        run = new_run(db)
        db.add(WorkflowStep(run=run, session_id=run.session_id, step_number=2))
        db.commit()
        assert [s.step_number for s in run.workflow_steps] == [2]


def test_wrong_objects_and_detached_reads_say_what_to_do(factory):
    with factory() as db:
        run = new_run(db)
        step = WorkflowStep(run=run, session_id=run.session_id, step_number=1)
        db.add(step)
        with pytest.raises(TypeError, match="WorkflowStep.run takes WorkflowRun objects"):
            step.run = Session(name="not a run")
        with pytest.raises(TypeError, match="WorkflowRun.workflow_steps takes WorkflowStep"):
            run.workflow_steps.append(run)
        db.commit()
        step_id = step.id
    with factory() as db:
        step = db.get(WorkflowStep, step_id)
    with pytest.raises(DetachedInstanceError, match="WorkflowStep.run is not loaded"):
        step.run


def test_reading_them_in_a_session_of_the_five_alone_says_which_session_to_use(db_url):
    import cmbagent_db
    import cmbagent_db.exceptions as exc

    with cmbagent_db.get_db_session(db_url) as db:
        run = new_run(db)
        db.commit()
        with pytest.raises(exc.InvalidRequestError, match="use a cmbagent_db.sqlalchemy session"):
            run.workflow_steps
        run.project_id = _id()
        with pytest.raises(exc.InvalidRequestError, match="WorkflowRun.project reads Project"):
            run.project
        db.rollback()
    assert WorkflowRun().workflow_steps == []  # a new object has none yet, as in SQLAlchemy


def test_a_back_populates_name_the_model_has_already_is_refused():
    """A name one of the five has for its own relationship (``run.approval_requests``),
    checked at mapper configuration, in a fresh interpreter (the registry is global)."""
    code = (
        "from sqlalchemy import Column, ForeignKey, Integer, String\n"
        "from sqlalchemy.orm import configure_mappers, relationship\n"
        "from cmbagent_db.sqlalchemy import Base\n"
        "class Note(Base):\n"
        "    __tablename__ = 'notes'\n"
        "    id = Column(Integer, primary_key=True)\n"
        "    run_id = Column(String(36), ForeignKey('workflow_runs.id'))\n"
        "    run = relationship('WorkflowRun', back_populates='approval_requests')\n"
        "configure_mappers()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert ("Note.run back_populates 'approval_requests', which WorkflowRun has already"
            in out.stderr)

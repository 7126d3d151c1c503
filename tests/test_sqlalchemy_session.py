"""``cmbagent_db.sqlalchemy.sessionmaker``: one session, one connection and one transaction
for the five models and SQLAlchemy's, in cmbagent's test-fixture pattern with only the
imports changed (in-memory ``StaticPool`` engine on SQLite, a fresh database on
PostgreSQL, ``Base.metadata.create_all``, ``sessionmaker``, services given ``db_factory``).
"""

from __future__ import annotations

import pytest
from sqlalchemy import Column, ForeignKey, Integer, String, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import UnmappedInstanceError

import cmbagent_db.exceptions as exc
from cmbagent_db.models import ApprovalRequest, Session, WorkflowRun
from cmbagent_db.sqlalchemy import Base, create_engine, sessionmaker

from helpers import fetch_all, fixture_engine


class RunStage(Base):
    """A stage of a run (as cmbagent's task stages)."""

    __tablename__ = "uow_run_stages"
    id = Column(Integer, primary_key=True)
    parent_run_id = Column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"),
                           nullable=False)
    name = Column(String(50), nullable=False)


@pytest.fixture
def db_engine(backend, db_url):
    with fixture_engine(backend, db_url, Base.metadata) as engine:
        yield engine


@pytest.fixture
def db_factory(db_engine):
    return sessionmaker(bind=db_engine, autocommit=False, autoflush=False,
                        expire_on_commit=False)


@pytest.fixture
def db_session(db_factory):
    session = db_factory()
    yield session
    session.rollback()
    session.close()


def start_run(db_factory, stages, *, bad_stage=False) -> str:
    """A service as cmbagent writes them: a run, its stages and an approval, one commit."""
    with db_factory() as db:
        chat = Session(name="chat")
        db.add(chat)
        db.flush()
        run = WorkflowRun(session_id=chat.id, status="executing")
        db.add(run)
        db.flush()
        db.add_all([RunStage(parent_run_id=run.id, name=n) for n in stages])
        if bad_stage:
            db.add(RunStage(parent_run_id="no-such-run", name="bad"))
        db.add(ApprovalRequest.create_pending(run_id=run.id, approval_type="plan_approval",
                                              context={"stages": stages}))
        db.commit()
        return run.id


def counts(db) -> tuple:
    return (db.query(Session).count(), db.query(WorkflowRun).count(),
            db.query(RunStage).count(), db.query(ApprovalRequest).count())


def test_a_run_its_stages_and_an_approval_commit_together(db_factory, db_session):
    run_id = start_run(db_factory, ["plan", "code"])
    assert counts(db_session) == (1, 1, 2, 1)
    run = db_session.get(WorkflowRun, run_id)
    assert isinstance(run, WorkflowRun) and run.status == "executing"
    stages = (db_session.query(RunStage).join(WorkflowRun, RunStage.parent_run_id == WorkflowRun.id)
              .filter(WorkflowRun.id == run_id).order_by(RunStage.name).all())
    assert [s.name for s in stages] == ["code", "plan"]
    assert db_session.get(RunStage, stages[0].id).name == "code"
    assert db_session.execute(text("SELECT count(*) FROM uow_run_stages WHERE parent_run_id = :r"),
                              {"r": run_id}).scalar() == 2
    approval = db_session.query(ApprovalRequest).filter(ApprovalRequest.run_id == run_id).one()
    assert approval.context == {"stages": ["plan", "code"]}


def test_a_failure_in_either_kind_leaves_nothing(db_factory, db_session):
    with pytest.raises(IntegrityError):
        start_run(db_factory, ["plan"], bad_stage=True)
    assert counts(db_session) == (0, 0, 0, 0)
    # a failure on the package's side: an approval naming no run
    with db_factory() as db:
        chat = Session(name="chat")
        db.add(chat)
        db.add(ApprovalRequest.create_pending(run_id="no-such-run", approval_type="x",
                                              context={}))
        with pytest.raises(exc.IntegrityError):
            db.commit()
        db.rollback()
        assert counts(db) == (0, 0, 0, 0)
        # usable after the rollback
        db.add(Session(name="after"))
        db.commit()
    assert counts(db_session) == (1, 0, 0, 0)


def test_rollback_discards_both_kinds(db_session):
    chat = Session(name="chat")
    db_session.add(chat)
    db_session.flush()
    run = WorkflowRun(session_id=chat.id)
    db_session.add(run)
    db_session.flush()
    db_session.add(RunStage(parent_run_id=run.id, name="s"))
    db_session.flush()
    assert db_session.in_transaction()
    db_session.rollback()
    assert counts(db_session) == (0, 0, 0, 0)


def test_bad_objects_are_refused_and_the_session_goes_on(db_session):
    with pytest.raises(UnmappedInstanceError):
        db_session.add(object())
    db_session.add(RunStage(parent_run_id="nope", name="s"))
    with pytest.raises(IntegrityError):
        db_session.flush()
    db_session.rollback()
    db_session.add(Session(name="fine"))
    db_session.commit()
    assert counts(db_session) == (1, 0, 0, 0)


def test_the_package_session_refuses_sqlalchemy_models_naming_the_session_that_takes_them(
        db_engine, db_url):
    """``cmbagent_db.get_db_session()`` holds the five alone: given one of SQLAlchemy's
    models it says which session takes both kinds, and goes on."""
    from cmbagent_db import get_db_session

    where = r"a session of cmbagent_db\.sqlalchemy \(its get_db_session\(\)"
    with get_db_session(db_url) as db:
        with pytest.raises(exc.InvalidRequestError, match=where):
            db.add(RunStage(parent_run_id="r", name="s"))
        with pytest.raises(TypeError, match=where):
            db.query(RunStage)
        with pytest.raises(exc.InvalidRequestError, match=where):
            db.get(RunStage, 1)
        with pytest.raises(exc.InvalidRequestError, match="not a mapped object") as plain:
            db.add(object())
        assert "cmbagent_db.sqlalchemy" not in str(plain.value)
        db.add(Session(name="fine"))
        db.commit()
        assert db.query(Session).count() == 1


def test_a_model_of_an_unrelated_base_fails_its_flush_and_loses_nothing(db_session):
    """A model declared on another declarative base, whose table create_all never made:
    its flush fails with the database's error, the five models' rows of the same
    transaction go with it, and the session goes on after rollback()."""
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.orm import declarative_base

    Other = declarative_base()

    class Stray(Other):
        __tablename__ = "uow_stray"
        id = Column(Integer, primary_key=True)

    db_session.add(Session(name="with the stray"))
    db_session.add(Stray(id=1))
    with pytest.raises(DBAPIError) as caught:
        db_session.commit()
    assert "uow_stray" in str(caught.value)
    db_session.rollback()
    assert counts(db_session) == (0, 0, 0, 0)
    db_session.add(Session(name="after"))
    db_session.commit()
    assert counts(db_session) == (1, 0, 0, 0)


def test_a_file_database_written_by_both_kinds_at_once_never_locks(sqlite_url):
    """Before, the run (this package) and its stages (SQLAlchemy) were written by two
    connections: the second waited for the first's write lock until 'database is locked'."""
    engine = create_engine(sqlite_url + "?timeout=1")
    Base.metadata.create_all(engine)
    factory = sessionmaker(bind=engine)
    for i in range(5):
        start_run(factory, [f"s{i}"])
    engine.dispose()
    assert fetch_all(sqlite_url, "SELECT count(*) FROM uow_run_stages") == [(5,)]
    assert fetch_all(sqlite_url, "SELECT count(*) FROM approval_requests") == [(5,)]


def test_a_session_needs_this_packages_engine():
    import sqlalchemy

    other = sqlalchemy.create_engine("sqlite://")
    with pytest.raises(exc.InterfaceError, match="create_engine"):
        sessionmaker(bind=other)()
    other.dispose()


def test_get_db_session_of_the_bridge_takes_both_kinds(db_url):
    """``cmbagent_db.sqlalchemy.get_db_session(url)``: one engine per URL, both kinds of
    models in one transaction, all or nothing."""
    from cmbagent_db.sqlalchemy import get_db_session

    Base.metadata.create_all(create_engine(db_url))
    with get_db_session(db_url) as db:
        chat = Session(name="chat")
        run = WorkflowRun(session_id=chat.id)
        db.add_all([chat, run, RunStage(parent_run_id=run.id, name="kept")])
        db.commit()
        db.add(RunStage(parent_run_id=run.id, name="dropped"))
        db.add(Session(name="dropped too"))
        db.flush()
        db.rollback()
    with get_db_session(db_url) as db:
        assert [s.name for s in db.query(RunStage).all()] == ["kept"]
        assert db.query(Session).count() == 1
        assert get_db_session(db_url).bind is db.bind  # the engine is made once


def test_services_run_in_a_bridge_session_and_commit_both_kinds(db_session):
    """approvals / connections given a bridge session: the session is flushed first, so
    their statements see its pending rows of both kinds, and a writing call's commit
    commits them."""
    from cmbagent_db import approvals, connections

    chat = Session(name="chat")
    run = WorkflowRun(session_id=chat.id)
    db_session.add_all([chat, run])
    db_session.add(RunStage(parent_run_id=run.id, name="waiting"))
    req = approvals.request(db_session, run.id, "plan_approval", {"plan": 1})
    assert approvals.resolve(db_session, req.id, "approved") is True
    connections.heartbeat(db_session, "task-1", session_id=chat.id, server_instance="a")
    db_session.add(RunStage(parent_run_id=run.id, name="after"))
    assert connections.owner(db_session, "task-1", ttl_seconds=60) == "a"  # reads, flushed
    assert db_session.execute(text("SELECT count(*) FROM uow_run_stages")).scalar() == 2
    db_session.rollback()  # undoes the flushed stage only: the writing calls committed
    assert counts(db_session) == (1, 1, 1, 1)
    assert db_session.get(ApprovalRequest, req.id).status == "resolved"

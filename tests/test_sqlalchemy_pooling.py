"""Whose pool a ``cmbagent_db.sqlalchemy`` session runs on: this package's, for an engine
left with SQLAlchemy's default pool (the five's work takes no SQLAlchemy connection, and the
session's connection is lent to SQLAlchemy when its ORM is first needed); SQLAlchemy's, for
an engine whose pool is configured or watched by listeners."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, ForeignKey, Integer, String, event, text
from sqlalchemy.pool import Pool, StaticPool

from cmbagent_db.models import Session, WorkflowRun
from cmbagent_db.sqlalchemy import Base, create_engine, sessionmaker
from cmbagent_db.sqlalchemy.pooling import own_pool_url

from helpers import fetch_all, terminate_backend


class PoolStage(Base):
    __tablename__ = "pool_run_stages"
    id = Column(Integer, primary_key=True)
    run_id = Column(String(36), ForeignKey("workflow_runs.id"), nullable=False)
    name = Column(String(50), nullable=False)


@pytest.fixture
def engine(db_url):
    engine = create_engine(db_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_the_five_alone_take_no_connection_of_sqlalchemys(engine):
    assert own_pool_url(engine) is not None
    factory = sessionmaker(bind=engine, autoflush=False, expire_on_commit=False)
    before = engine.pool.checkedin()
    with factory() as db:
        chat = Session(name="chat")
        db.add(chat)
        db.flush()  # a transaction is open on this package's connection
        assert engine.pool.checkedout() == 0
        db.add(WorkflowRun(session_id=chat.id))
        db.commit()
        assert db.query(WorkflowRun).count() == 1
    assert engine.pool.checkedout() == 0 and engine.pool.checkedin() == before


def test_the_open_transaction_is_handed_to_sqlalchemy(engine, db_url):
    """The five's rows flushed before SQLAlchemy is first used and SQLAlchemy's rows after
    are one transaction: invisible to others until commit, all gone on rollback."""
    factory = sessionmaker(bind=engine, autoflush=False, expire_on_commit=False)
    with factory() as db:
        chat = Session(name="chat")
        run = WorkflowRun(session_id=chat.id)
        db.add_all([chat, run])
        db.flush()
        db.add(PoolStage(run_id=run.id, name="plan"))  # needs the run's row: same transaction
        db.flush()
        assert db.execute(text("SELECT count(*) FROM workflow_runs")).scalar() == 1
        assert fetch_all(db_url, "SELECT count(*) FROM workflow_runs") == [(0,)]
        db.rollback()
        assert db.query(WorkflowRun).count() == 0
        assert db.query(PoolStage).count() == 0
        db.add_all([Session(name="again"), PoolStage(run_id="none", name="orphan")])
        with pytest.raises(Exception):
            db.commit()  # the stage's foreign key fails: nothing of either kind stays
        db.rollback()
        db.add(chat := Session(name="kept"))
        db.add(PoolStage(run_id=(run := WorkflowRun(session_id=chat.id)).id, name="kept"))
        db.add(run)
        db.commit()
    assert fetch_all(db_url, "SELECT name FROM sessions") == [("kept",)]
    assert fetch_all(db_url, "SELECT name FROM pool_run_stages") == [("kept",)]


def test_sqlalchemy_first_takes_its_pools_connection_and_the_five_follow(engine, db_url):
    factory = sessionmaker(bind=engine, autoflush=False, expire_on_commit=False)
    with factory() as db:
        assert db.execute(text("SELECT count(*) FROM sessions")).scalar() == 0
        assert engine.pool.checkedout() == 1
        db.add(Session(name="chat"))
        db.flush()
        assert db.execute(text("SELECT count(*) FROM sessions")).scalar() == 1
        assert fetch_all(db_url, "SELECT count(*) FROM sessions") == [(0,)]
        db.commit()
    assert engine.pool.checkedout() == 0
    assert fetch_all(db_url, "SELECT name FROM sessions") == [("chat",)]


def test_lent_connections_go_back_to_this_packages_pool(pg_url):
    engine = create_engine(pg_url)
    Base.metadata.create_all(engine)
    factory = sessionmaker(bind=engine)
    for i in range(40):
        with factory() as db:
            chat = Session(name=f"c{i}")
            run = WorkflowRun(session_id=chat.id)
            db.add_all([chat, run])
            db.flush()  # the five hold a transaction: their connection is lent
            db.add(PoolStage(run_id=run.id, name="s"))
            db.commit()
    with factory() as db:
        held = db.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        )).scalar()
    assert held <= 4  # this one, SQLAlchemy's first-connect one, and idle ones of ours
    assert fetch_all(pg_url, "SELECT count(*) FROM pool_run_stages") == [(40,)]
    engine.dispose()


@pytest.mark.parametrize("pool", ["lent", "sqlalchemys first", "sqlalchemys only"])
def test_a_lost_shared_connection_fails_clearly_and_the_session_goes_on(pg_url, pool):
    """Whichever pool the shared connection came from, its loss is one clear error and,
    after rollback(), both kinds go on in the same session on a new connection."""
    engine = create_engine(pg_url, **({"pool_size": 2} if pool == "sqlalchemys only" else {}))
    assert (own_pool_url(engine) is None) == (pool == "sqlalchemys only")
    Base.metadata.create_all(engine)
    db = sessionmaker(bind=engine)()
    if pool == "lent":
        db.add(Session(name="before"))
        db.flush()
    pid = db.execute(text("SELECT pg_backend_pid()")).scalar()
    terminate_backend(pg_url, pid)
    with pytest.raises(Exception, match="(?i)connection|terminat|closed"):
        db.execute(text("SELECT 1")).scalar()
    db.rollback()
    chat = Session(name="after")
    db.add_all([chat, run := WorkflowRun(session_id=chat.id)])
    db.flush()
    db.add(PoolStage(run_id=run.id, name="after"))
    db.commit()
    assert db.execute(text("SELECT count(*) FROM pool_run_stages")).scalar() == 1
    assert db.query(Session).count() == 1
    db.close()
    engine.dispose()


@pytest.mark.parametrize("where", ["engine", "Pool class", "engine after dispose"])
def test_a_listener_added_later_sends_the_next_sessions_to_sqlalchemys_pool(sqlite_url, where):
    engine = create_engine(sqlite_url)
    Base.metadata.create_all(engine)
    factory = sessionmaker(bind=engine)
    with factory() as db:
        db.add(Session(name="before"))
        db.commit()
    assert own_pool_url(engine) is not None
    if where == "engine after dispose":
        engine.dispose()  # a new pool, with the listeners of the old one
        assert own_pool_url(engine) is not None
    seen = []

    def checkout(dbapi_connection, record, proxy):
        seen.append(dbapi_connection)

    target = Pool if where == "Pool class" else engine
    event.listen(target, "checkout", checkout)
    try:
        assert own_pool_url(engine) is None
        with factory() as db:
            db.add(Session(name="after"))
            db.commit()
        assert len(seen) == 1
    finally:
        event.remove(target, "checkout", checkout)
    assert own_pool_url(engine) is not None  # only the dialect's listeners again
    assert sorted(fetch_all(sqlite_url, "SELECT name FROM sessions")) == [("after",), ("before",)]
    engine.dispose()


@pytest.mark.parametrize("how", ["static", "sized", "listener", "connect_args"])
def test_an_engine_with_pool_settings_keeps_sqlalchemys_pool(sqlite_url, how):
    seen = []
    if how == "static":
        engine = create_engine(sqlite_url, poolclass=StaticPool,
                               connect_args={"check_same_thread": False})
    elif how == "sized":
        engine = create_engine(sqlite_url, pool_size=2, max_overflow=0)
    elif how == "connect_args":
        engine = create_engine(sqlite_url, connect_args={"timeout": 2.0})
    else:
        engine = create_engine(sqlite_url)

        @event.listens_for(engine, "connect")
        def pragmas(dbapi_connection, record):
            seen.append(dbapi_connection)
            dbapi_connection.cursor().execute("PRAGMA foreign_keys=ON")

    assert own_pool_url(engine) is None
    Base.metadata.create_all(engine)
    with sessionmaker(bind=engine)() as db:
        db.add(Session(name="chat"))
        db.flush()
        if how != "static":  # (StaticPool does not count)
            assert engine.pool.checkedout() == 1
        db.commit()
    if how == "listener":
        assert len(seen) == 1  # ran on the one connection every session used
    assert fetch_all(sqlite_url, "SELECT name FROM sessions") == [("chat",)]
    engine.dispose()



def test_dispose_engines_closes_idle_connections_of_get_db_sessions_engines(pg_url):
    """``cmbagent_db.dispose_engines()`` also empties SQLAlchemy's pool of the engine that
    ``cmbagent_db.sqlalchemy.get_db_session`` made for the URL; its sessions go on."""
    import time

    import cmbagent_db
    from cmbagent_db.sqlalchemy import get_db_session

    def others_after(seconds: float) -> int:
        """Other connections to the database, waited for to go down to none (a server
        process ends a moment after its client closes)."""
        deadline = time.monotonic() + seconds
        while True:
            (n,), = fetch_all(pg_url, "SELECT count(*) FROM pg_stat_activity WHERE datname "
                                      "= current_database() AND pid <> pg_backend_pid()")
            if n == 0 or time.monotonic() > deadline:
                return n
            time.sleep(0.05)

    with get_db_session(pg_url) as db:
        assert db.execute(text("SELECT 1")).scalar() == 1  # on a connection of its pool
    assert others_after(0) >= 1
    cmbagent_db.dispose_engines()
    assert others_after(5) == 0
    with get_db_session(pg_url) as db:
        db.add(Session(name="after"))
        db.commit()
    assert fetch_all(pg_url, "SELECT name FROM sessions") == [("after",)]
    cmbagent_db.dispose_engines()

"""SQLAlchemy on this package's connections (``cmbagent_db.sqlalchemy``): the
``cmbagent_db+sqlite`` / ``cmbagent_db+postgresql`` dialects with SQLAlchemy's own models,
as cmbagent's other models and test fixtures use them (in-memory ``StaticPool`` engine,
``create_all``, ``sessionmaker``), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest
import sqlalchemy
from sqlalchemy import (
    JSON, TIMESTAMP, BigInteger, Boolean, Column, ForeignKey, Integer, Numeric, String,
    Text, func, select, text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm import declarative_base, relationship, sessionmaker

import cmbagent_db.exceptions as exc
from cmbagent_db.sqlalchemy import create_engine, engine_url

from helpers import fetch_all, fixture_engine, run_threads, terminate_backend

UTC = dt.timezone.utc
Base = declarative_base()


def new_id() -> str:
    return str(uuid.uuid4())


class Job(Base):
    """A parent table with every column type cmbagent's models use."""

    __tablename__ = "jobs"
    id = Column(String(36), primary_key=True, default=new_id)
    title = Column(String(100), nullable=False)
    notes = Column(Text)
    attempts = Column(Integer, default=0)
    bytes_moved = Column(BigInteger)
    done = Column(Boolean, default=False)
    cost = Column(Numeric(10, 6))
    meta = Column(JSON)
    started_at = Column(TIMESTAMP(timezone=True), default=lambda: dt.datetime.now(UTC))
    logged_at = Column(TIMESTAMP)
    steps = relationship("Step", back_populates="job", cascade="all, delete-orphan",
                         order_by="Step.position")


class Step(Base):
    __tablename__ = "steps"
    id = Column(Integer, primary_key=True)
    job_id = Column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    position = Column(Integer, nullable=False)
    label = Column(String(20))
    job = relationship("Job", back_populates="steps")


@pytest.fixture
def engine(backend, db_url):
    with fixture_engine(backend, db_url, Base.metadata) as e:
        yield e


@pytest.fixture
def factory(engine):
    return sessionmaker(bind=engine, autocommit=False, autoflush=False, expire_on_commit=False)


def test_urls_name_this_driver():
    assert engine_url("sqlite:///x.db").drivername == "cmbagent_db+sqlite"
    assert engine_url("postgresql://u@h/d").drivername == "cmbagent_db+postgresql"
    assert engine_url("postgres://u@h/d").drivername == "cmbagent_db+postgresql"
    assert engine_url("cmbagent_db+sqlite://").drivername == "cmbagent_db+sqlite"
    with pytest.raises(exc.NotSupportedError, match="another driver"):
        engine_url("postgresql+psycopg2://u@h/d")
    # the dialects are registered with SQLAlchemy itself
    e = sqlalchemy.create_engine("cmbagent_db+sqlite://")
    assert (e.dialect.name, e.dialect.driver) == ("sqlite", "cmbagent_db")
    # compiled SQL is cached (SQLAlchemy warns and compiles every statement anew otherwise)
    assert e.dialect._supports_statement_cache
    assert sqlalchemy.create_engine("cmbagent_db+postgresql://u@h/d").dialect._supports_statement_cache
    with e.connect() as c:
        assert c.execute(text("SELECT 40 + 2")).scalar() == 42
    e.dispose()


def test_every_column_type_round_trips(factory):
    now = dt.datetime.now(UTC).replace(microsecond=654321)
    with factory() as s:
        job = Job(title="t", notes="ü" * 300, attempts=3, bytes_moved=2**40, done=True,
                  cost=Decimal("12.345678"), meta={"plan": [1, {"a": None}], "k": "v"},
                  started_at=now, logged_at=now.replace(tzinfo=None))
        s.add(job)
        s.commit()
        job_id = job.id
    with factory() as s:
        got = s.get(Job, job_id)
        assert (got.title, got.notes, got.attempts, got.bytes_moved, got.done) == (
            "t", "ü" * 300, 3, 2**40, True)
        assert got.cost == Decimal("12.345678") and isinstance(got.cost, Decimal)
        assert got.meta == {"plan": [1, {"a": None}], "k": "v"}
        assert got.logged_at == now.replace(tzinfo=None)
        # SQLite keeps no time zone (as with pysqlite); PostgreSQL's timestamptz does
        assert got.started_at.replace(tzinfo=UTC) == now


def test_postgresql_uuid_jsonb_and_array_columns_round_trip(pg_url):
    """``postgresql.UUID`` and ``JSONB``, as cmbagent's models declare them, and ``ARRAY``:
    bound, read and compared through SQLAlchemy on this driver."""
    from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

    meta = sqlalchemy.MetaData()
    tags = sqlalchemy.Table(
        "pg_tags", meta,
        Column("id", UUID(as_uuid=True), primary_key=True),
        Column("labels", ARRAY(String(20))),
        Column("scores", ARRAY(Numeric(6, 2), dimensions=2)),
        Column("doc", JSONB),
    )
    e = create_engine(pg_url)
    meta.create_all(e)
    u, other = uuid.uuid4(), uuid.uuid4()
    with e.begin() as c:
        c.execute(tags.insert(), [
            {"id": u, "labels": ["a", "b c", None], "scores": [[Decimal("1.5"), 2]],
             "doc": {"k": [1, None]}},
            {"id": other, "labels": [], "scores": None, "doc": None},
        ])
    with e.connect() as c:
        row = c.execute(select(tags).where(tags.c.id == u)).one()
        assert row.labels == ["a", "b c", None] and row.doc == {"k": [1, None]}
        assert row.scores == [[Decimal("1.50"), Decimal("2.00")]]
        assert isinstance(row.id, uuid.UUID)
        has_b_c = sqlalchemy.any_(tags.c.labels) == "b c"
        assert c.execute(select(tags.c.id).where(has_b_c)).scalars().all() == [u]
        assert c.execute(
            select(tags.c.id).where(tags.c.labels.contains(["a"]))).scalars().all() == [u]
        assert c.execute(select(tags.c.id).where(tags.c.doc["k"].isnot(None))).scalar() == u
        lengths = func.cardinality(tags.c.labels)
        assert c.execute(select(lengths).order_by(lengths)).scalars().all() == [0, 3]
    meta.drop_all(e)
    e.dispose()


def test_parent_and_children_in_one_commit_and_relationships(factory):
    with factory() as s:
        job = Job(title="run")
        s.add(job)
        s.flush()  # the parent's id, before its children are added
        s.add_all([Step(job_id=job.id, position=i, label=f"s{i}") for i in (2, 1, 3)])
        s.commit()
        job_id = job.id
    with factory() as s:
        job = s.get(Job, job_id)
        assert [st.label for st in job.steps] == ["s1", "s2", "s3"]
        assert job.steps[0].job is job
        rows = (s.query(Step).join(Job, Step.job_id == Job.id)
                .order_by(Job.started_at.desc(), Step.position).all())
        assert [r.position for r in rows] == [1, 2, 3]
        assert s.execute(text("SELECT count(*) FROM steps WHERE job_id = :j"),
                         {"j": job_id}).scalar() == 3
        assert s.scalar(select(func.count()).select_from(Step)) == 3
        s.delete(job)
        s.commit()
        assert s.scalar(select(func.count()).select_from(Step)) == 0


def test_a_failed_flush_rolls_everything_back_and_the_session_goes_on(factory, engine):
    with factory() as s:
        s.add(Job(id="keep", title="kept"))
        s.commit()
        job = Job(title="doomed")
        s.add(job)
        s.flush()
        s.add(Step(job_id="no-such-job", position=1))
        with pytest.raises(IntegrityError) as caught:
            s.commit()
        assert isinstance(caught.value.orig, exc.IntegrityError)
        s.rollback()
        assert s.scalar(select(func.count()).select_from(Job)) == 1
        s.add(Job(title=None))  # NOT NULL
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
        with pytest.raises(StatementError):
            s.execute(text("SELECT * FROM jobs WHERE id = :id"), {"other": 1})
        s.rollback()
        with pytest.raises(DBAPIError):
            s.execute(text("SELECT no_such_column FROM jobs"))
        s.rollback()
        # usable afterwards
        s.add(Job(id="after", title="after"))
        s.commit()
        assert sorted(s.scalars(select(Job.id))) == ["after", "keep"]


def test_autocommit_isolation_level(engine):
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(Job.__table__.insert().values(id="auto", title="a"))
        assert c.connection.dbapi_connection.autocommit
        assert not c.connection.dbapi_connection.in_transaction
    with engine.connect() as c:
        assert c.execute(select(Job.title).where(Job.id == "auto")).scalar() == "a"
        assert not c.connection.dbapi_connection.autocommit


def test_sqlite_writers_in_threads_wait_for_each_other(sqlite_url):
    """Four threads with sessions of their own write one file at once (an UPDATE and an
    INSERT per transaction): each waits for the write lock in turn, none fails."""
    e = create_engine(sqlite_url)
    Base.metadata.create_all(e)
    factory = sessionmaker(bind=e)
    with factory() as s:
        s.add(Job(id="counter", title="0", attempts=0))
        s.commit()
    errors = []

    def bump(k):
        try:
            for i in range(20):
                with factory() as s:
                    job = s.get(Job, "counter")
                    job.attempts = Job.attempts + 1  # computed by the UPDATE itself
                    s.add(Step(job_id="counter", position=k * 100 + i))
                    s.commit()
        except Exception as ex:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(ex))

    run_threads(bump, [(k,) for k in range(4)])
    e.dispose()
    assert errors == []
    assert fetch_all(sqlite_url, "SELECT attempts FROM jobs") == [(80,)]
    assert fetch_all(sqlite_url, "SELECT count(DISTINCT position) FROM steps") == [(80,)]


def test_a_terminated_postgresql_connection_is_replaced(pg_url):
    e = create_engine(pg_url, pool_size=1, max_overflow=0)
    with e.connect() as c:
        pid = c.execute(text("SELECT pg_backend_pid()")).scalar()
    terminate_backend(pg_url, pid)
    with pytest.raises(DBAPIError) as caught:
        with e.connect() as c:
            c.execute(text("SELECT 1"))
    assert caught.value.connection_invalidated
    with e.connect() as c:
        assert c.execute(text("SELECT pg_backend_pid()")).scalar() != pid
    e.dispose()


def test_the_package_and_sqlalchemy_share_one_sqlite_file(sqlite_url):
    """The package's sessions and SQLAlchemy on its driver see each other's commits."""
    import cmbagent_db
    from cmbagent_db.models import Session as ChatSession

    cmbagent_db.init_database(sqlite_url)
    db = cmbagent_db.get_db_session(sqlite_url)
    db.add(ChatSession(id="s1", name="from the package"))
    db.commit()
    e = create_engine(sqlite_url)
    with e.connect() as c:
        assert c.execute(text("SELECT name FROM sessions WHERE id = 's1'")).scalar() == (
            "from the package")
        c.execute(text("UPDATE sessions SET name = 'from sqlalchemy' WHERE id = 's1'"))
        c.commit()
    assert db.get(ChatSession, "s1").name == "from the package"  # tracked, not refreshed
    db.close()
    with cmbagent_db.get_db_session(sqlite_url) as fresh:
        assert fresh.get(ChatSession, "s1").name == "from sqlalchemy"
    e.dispose()

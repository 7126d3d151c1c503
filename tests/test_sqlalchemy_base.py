"""``cmbagent_db.sqlalchemy.Base``: SQLAlchemy models of cmbagent's other tables beside the
five, as cmbagent declares them (foreign keys to ``workflow_runs`` and ``sessions``), tables
made by ``Base.metadata.create_all`` exactly as the migrations make them, and the five
model classes and their columns and criteria inside SQLAlchemy queries. SQLite and
PostgreSQL (``db_url``), plus cmbagent's in-memory ``StaticPool`` fixture.
"""

from __future__ import annotations

import pytest
import sqlalchemy
from sqlalchemy import Column, ForeignKey, Integer, String, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

import cmbagent_db
import cmbagent_db.exceptions as exc
from cmbagent_db import get_db_session
from cmbagent_db.models import ApprovalRequest, Session, WorkflowRun
from cmbagent_db.sqlalchemy import OWN_TABLES, Base, create_engine

from helpers import column_names, index_info, is_sqlite, sa_url, table_names


class Stage(Base):
    """A stage of a run, as cmbagent's task stages point at workflow_runs and sessions."""

    __tablename__ = "bridge_stages"
    id = Column(String(36), primary_key=True)
    parent_run_id = Column(String(36), ForeignKey("workflow_runs.id", ondelete="CASCADE"),
                           nullable=False)
    session_id = Column(String(36), ForeignKey("sessions.id"), nullable=True)
    position = Column(Integer, nullable=False)


@pytest.fixture
def engine(db_url):
    e = create_engine(db_url)
    Base.metadata.create_all(e)
    yield e
    Base.metadata.drop_all(e)
    e.dispose()


def test_the_metadata_holds_the_five_tables_as_the_schema_declares_them(sqlite_url):
    cmbagent_db.init_database(sqlite_url)
    assert OWN_TABLES == {"sessions", "workflow_runs", "session_states", "approval_requests",
                          "active_connections"}
    for name in OWN_TABLES:
        table = Base.metadata.tables[name]
        assert [c.name for c in table.columns] == column_names(sqlite_url, name)
        assert [c.name for c in table.primary_key] == ["id"]
    runs = Base.metadata.tables["workflow_runs"]
    fk = next(iter(runs.c.session_id.foreign_keys))
    assert (fk.column.table.name, fk.ondelete) == ("sessions", "CASCADE")
    assert runs.c.task_description.type.__class__.__name__ == "Text"
    assert runs.c.mode.type.length == 50 and not runs.c.mode.nullable
    # Stage's foreign keys resolved against them
    assert next(iter(Stage.__table__.c.parent_run_id.foreign_keys)).column is runs.c.id


def test_create_all_makes_the_five_tables_as_the_migrations_do(engine, db_url, new_db_url,
                                                               backend):
    assert cmbagent_db.current(db_url) == cmbagent_db.history()[-1]
    assert set(table_names(db_url)) >= OWN_TABLES | {"bridge_stages"}
    reference = new_db_url(backend)
    cmbagent_db.init_database(reference)
    for name in OWN_TABLES:
        assert column_names(db_url, name) == column_names(reference, name)
        assert index_info(db_url, name) == index_info(reference, name), name
    # and the package's sessions take the database as theirs, with no warning or migration
    with get_db_session(db_url) as db:
        assert db.query(WorkflowRun).count() == 0


@pytest.mark.parametrize("through", ["its own driver", "this package"])
def test_alembic_autogenerate_finds_the_database_as_the_metadata_declares_it(engine, db_url,
                                                                              through):
    """cmbagent's env.py runs autogenerate against ``Base.metadata``, on an engine of its own
    (``engine_from_config``: pysqlite, psycopg2) or on this package's ``create_engine``, whose
    reflection reads PostgreSQL's catalog arrays: a database the migrations made shows no
    difference, given ``include_name``."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from cmbagent_db.sqlalchemy import BOOKKEEPING_TABLES, include_name

    if through == "this package":
        alembics = create_engine(db_url, poolclass=sqlalchemy.pool.NullPool)
    else:
        alembics = sqlalchemy.create_engine(sa_url(db_url), poolclass=sqlalchemy.pool.NullPool)

    def differences(**opts):
        with alembics.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts=opts), Base.metadata)

    def expected(diff):
        # Other test modules' models on the same Base: not this test's concern.
        table = diff[1] if isinstance(diff[1], sqlalchemy.Table) else diff[1].table
        if table.name not in OWN_TABLES | BOOKKEEPING_TABLES:
            return True
        if diff[0] in ("remove_fk", "add_fk"):
            # A key to an application's table (approval_requests.step_id, once a model of
            # workflow_steps is declared) is the application's to make.
            if diff[1].referred_table.name not in OWN_TABLES:
                return True
            # SQLAlchemy's SQLite reflection reads no ON DELETE of a column added by ALTER
            # TABLE (revision 003's workflow_runs.parent_run_id).
            return is_sqlite(db_url) and diff[1].column_keys == ["parent_run_id"]
        return False

    assert [d for d in differences(include_name=include_name) if not expected(d)] == []
    # Without the hook, the bookkeeping tables there would be dropped by the generated script.
    removed = {d[1].name for d in differences() if d[0] == "remove_table"}
    assert removed == set(table_names(db_url)) & BOOKKEEPING_TABLES
    assert "cmbagent_db_migrations" in removed
    assert ("cmbagent_db_approval_changes" in removed) == is_sqlite(db_url)
    alembics.dispose()


def test_drop_all_drops_both_kinds(db_url):
    e = create_engine(db_url)
    Base.metadata.create_all(e)
    Base.metadata.drop_all(e)
    e.dispose()
    assert set(table_names(db_url)) & (OWN_TABLES | {"bridge_stages"}) == set()
    # the migrations went down to base (their bookkeeping stays, as Alembic's does)
    assert cmbagent_db.current(db_url) is None


def test_foreign_keys_hold_across_both_kinds_of_models(engine, db_url):
    with get_db_session(db_url) as db:
        s = Session(name="n")
        db.add(s)
        db.commit()
        run = WorkflowRun(session_id=s.id)
        db.add(run)
        db.commit()
        run_id, session_id = run.id, s.id
    factory = sessionmaker(bind=engine, autocommit=False, autoflush=False,
                           expire_on_commit=False)
    with factory() as sa:
        sa.add_all([Stage(id=f"st{i}", parent_run_id=run_id, session_id=session_id,
                          position=i) for i in range(3)])
        sa.commit()
        sa.add(Stage(id="orphan", parent_run_id="no-such-run", position=9))
        with pytest.raises(IntegrityError):
            sa.commit()
        sa.rollback()
        assert sa.query(Stage).count() == 3
    # ON DELETE CASCADE from the package's side reaches SQLAlchemy's table
    with get_db_session(db_url) as db:
        db.delete(db.get(WorkflowRun, run_id))
        db.commit()
    with factory() as sa:
        assert sa.query(Stage).count() == 0


def test_the_five_models_work_inside_sqlalchemy_queries(engine, db_url):
    with get_db_session(db_url) as db:
        s = Session(name="n")
        db.add(s)
        db.commit()
        for i, status in enumerate(["draft", "executing", "completed"]):
            run = WorkflowRun(id=f"run{i}", session_id=s.id, status=status)
            db.add(run)
        db.commit()
    factory = sessionmaker(bind=engine)
    with factory() as sa:
        sa.add_all([Stage(id=f"st{i}", parent_run_id=f"run{i}", position=i) for i in range(3)])
        sa.commit()
        got = (sa.query(Stage).join(WorkflowRun, Stage.parent_run_id == WorkflowRun.id)
               .filter(WorkflowRun.status.in_(["draft", "executing"]),
                       WorkflowRun.completed_at == None)  # noqa: E711 - SQL NULL test
               .order_by(WorkflowRun.id.desc()).all())
        assert [st.id for st in got] == ["st1", "st0"]
        # the join condition inferred from the foreign key; a comparison written either way
        assert sa.query(Stage).join(WorkflowRun).filter(WorkflowRun.id == "run2").count() == 1
        assert sa.query(Stage).filter(WorkflowRun.id == Stage.parent_run_id,
                                      (WorkflowRun.status == "draft")
                                      | (WorkflowRun.status == "completed")).count() == 2
        rows = sa.execute(select(WorkflowRun.id, WorkflowRun.status)
                          .where(~(WorkflowRun.status == "draft"))
                          .order_by(WorkflowRun.id)).all()
        assert rows == [("run1", "executing"), ("run2", "completed")]
        assert sa.scalar(select(sqlalchemy.func.count()).select_from(WorkflowRun)) == 3
        # values are checked as the package checks them
        with pytest.raises(TypeError, match="expects a str"):
            select(WorkflowRun).where(WorkflowRun.id == 5)


def test_instances_are_not_clauses_and_aliases_say_so():
    run = WorkflowRun(session_id="s")
    assert not hasattr(run, "__clause_element__")
    assert hasattr(WorkflowRun, "__clause_element__")
    parent = cmbagent_db.aliased(WorkflowRun)
    with pytest.raises(exc.NotSupportedError, match="aliased"):
        select(Stage).where(Stage.parent_run_id == parent.id)
    with pytest.raises(exc.NotSupportedError, match="asc"):
        select(Stage).order_by(cmbagent_db.func.count(ApprovalRequest.id).desc())


def test_cmbagents_in_memory_fixture_pattern():
    e = create_engine("sqlite:///:memory:", connect_args={"check_same_thread": False},
                      poolclass=StaticPool)
    Base.metadata.create_all(e)
    with e.connect() as c:
        names = {r[0] for r in c.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))}
    assert names >= OWN_TABLES | {"bridge_stages"}
    Base.metadata.drop_all(e)
    e.dispose()


def test_create_all_on_another_driver_says_which_engine_to_use():
    other = sqlalchemy.create_engine("sqlite://")
    with pytest.raises(exc.InterfaceError, match="cmbagent_db.sqlalchemy.create_engine"):
        Base.metadata.create_all(other)
    other.dispose()

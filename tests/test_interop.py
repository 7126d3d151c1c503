"""cmbagent_db and cmbagent's SQLAlchemy models share one database.

cmbagent databases already hold rows written by SQLAlchemy, and the SQLAlchemy
models may still run against a database this package manages.  These tests
write with one side and read with the other, on every backend, and check that
a database SQLAlchemy created without Alembic is adopted with all its rows.

The reference models (tests/reference_models.py) are cmbagent's own: on SQLite
SQLAlchemy stores TIMESTAMP as naive text and returns naive datetimes, so its
values are compared after ``as_utc``; ours must always come back aware UTC.
"""

import re
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import TIMESTAMP, create_engine
from sqlalchemy.orm import Session as SASession

import cmbagent_db
import reference_models as ref
from cmbagent_db import models as ours
import helpers
from helpers import sa_url

UTC = timezone.utc
HEAD = "004_approval_changes"
OUR_TABLES = {
    "sessions",
    "workflow_runs",
    "session_states",
    "approval_requests",
    "active_connections",
}

# ensure_ascii escapes (SQLAlchemy's json.dumps), quotes, backslashes,
# control characters and characters outside the BMP.
UNICODE = 'π ≈ 3.14159 — ünïcödé 🚀 中文 "quoted" back\\slash\nnew line\ttab'
NESTED = {
    "plan": {
        "steps": [
            {"n": 1, "agent": "engineer", "done": True},
            {"n": 2, "agent": "researcher", "done": False, "notes": None},
        ],
        "budget": 1.5,
        "tiny": 1e-300,
        "tenth": 0.1,
        "beyond_double": 2**53 + 1,
        "negative": -7,
        "empty_list": [],
        "empty_dict": {},
    },
    "ключ": UNICODE,
    "tags": ["a", "b", None, 3, 0.1, False],
}
# 255 characters, most of them several bytes long: String(255) counts
# characters, as PostgreSQL does, not bytes.
NAME_255 = ("ü🚀中" * 85)[:255]


# Columns the reference models fill with server_default=func.now().
SERVER_DEFAULTS = [
    ("SessionState", "created_at"),
    ("SessionState", "updated_at"),
    ("ApprovalRequest", "created_at"),
    ("ActiveConnection", "connected_at"),
    ("ActiveConnection", "last_heartbeat"),
]


def as_utc(value):
    """The instant a SQLAlchemy datetime stands for (naive means UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def column_keys(ref_cls):
    return [c.key for c in ref_cls.__table__.columns]


def timestamp_keys(ref_cls):
    return [c.key for c in ref_cls.__table__.columns if isinstance(c.type, TIMESTAMP)]


def snapshot(obj, name):
    """Values of the columns of reference model `name` held by `obj` (reference or ours)."""
    return {key: getattr(obj, key) for key in column_keys(getattr(ref, name))}


def assert_aware_utc(value, where):
    assert isinstance(value, datetime), f"{where}: {value!r} is not a datetime"
    assert value.tzinfo is not None, f"{where}: {value!r} is naive"
    assert value.utcoffset() == timedelta(0), f"{where}: {value!r} is not UTC"


def assert_ours_matches(obj, expected, table):
    """`obj` (one of ours) holds the values `expected` (read by SQLAlchemy)."""
    for key, want in expected.items():
        got = getattr(obj, key)
        where = f"{table}.{key}"
        if isinstance(want, datetime):
            assert_aware_utc(got, where)
            assert got == as_utc(want), f"{where}: ours {got!r}, SQLAlchemy {want!r}"
        else:
            assert got == want, f"{where}: ours {got!r}, SQLAlchemy {want!r}"
            assert type(got) is type(want), f"{where}: ours {type(got)}, SQLAlchemy {type(want)}"


def assert_reference_matches(obj, expected, table):
    """`obj` (read by SQLAlchemy) holds the values `expected` (ours)."""
    for key, want in expected.items():
        got = getattr(obj, key)
        where = f"{table}.{key}"
        if isinstance(want, datetime):
            assert isinstance(got, datetime), f"{where}: SQLAlchemy read {got!r}"
            # A naive value a caller gave stands for UTC, on our side as well.
            assert as_utc(got) == as_utc(want), f"{where}: SQLAlchemy {got!r}, ours {want!r}"
        else:
            assert got == want, f"{where}: SQLAlchemy {got!r}, ours {want!r}"
            assert type(got) is type(want), f"{where}: SQLAlchemy {type(got)}, ours {type(want)}"


def expected_to_dict(ref_cls, values):
    """The reference model's to_dict for these values, timestamps as aware UTC."""
    converted = {k: as_utc(v) if isinstance(v, datetime) else v for k, v in values.items()}
    return ref_cls(**converted).to_dict()


def python_sqlite_turn():
    """Close cmbagent_db's idle connections before Python's sqlite3 touches the file.

    SQLAlchemy and tests/helpers.py go through Python's sqlite3.  Should cmbagent_db carry
    its own copy of SQLite (a bundled build), the two copies would not see each other's
    POSIX locks, and closing Python's last connection would delete the WAL under our open
    ones (sqlite.org/howtocorrupt.html, 2.2.1).  The value tests take turns so that they
    test values only; living together with open connections is the subject of
    test_sqlalchemy_in_the_same_process_loses_no_commit.
    """
    cmbagent_db.dispose_engines()


def fetch_all(url, sql):
    python_sqlite_turn()
    return helpers.fetch_all(url, sql)


def table_names(url):
    python_sqlite_turn()
    return helpers.table_names(url)


def row_count(url, table):
    python_sqlite_turn()
    return helpers.row_count(url, table)


@contextmanager
def sa_session(url):
    python_sqlite_turn()
    engine = create_engine(sa_url(url))
    try:
        with SASession(engine) as session:
            yield session
    finally:
        engine.dispose()


@contextmanager
def our_session(url):
    db = cmbagent_db.get_db_session(url)
    try:
        yield db
    finally:
        db.close()


def stored_timestamps(url, table, keys):
    """Raw stored values of the timestamp columns of every row of a table."""
    rows = fetch_all(url, f"SELECT {', '.join(keys)} FROM {table}")
    return [value for row in rows for value in row if value is not None]


# --------------------------------------------------------------------------------------
# SQLAlchemy writes, cmbagent_db reads
# --------------------------------------------------------------------------------------


def write_reference_rows(session):
    """Rows covering every column type and NULL flavour, written by the reference models.

    Returns {model name: [objects]} in insertion order.
    """
    s1 = ref.Session(
        name=UNICODE,
        user_id=str(uuid.uuid4()),
        created_at=datetime(2024, 2, 29, 23, 59, 58, 123456),
        meta=NESTED,
        resource_limits=None,  # explicit None: SQLAlchemy stores JSON 'null'
    )
    s2 = ref.Session(name="plain", status="archived", resource_limits={"max_runs": 5})
    session.add_all([s1, s2])
    session.flush()  # SQLAlchemy fills the id defaults at flush

    w1 = ref.WorkflowRun(session_id=s1.id)  # every default, SQL NULLs elsewhere
    w2 = ref.WorkflowRun(
        session_id=s1.id,
        project_id=str(uuid.uuid4()),
        mode="planning_and_control",
        agent="planner",
        model="claude-3-5-sonnet",
        status="waiting_approval",
        started_at=datetime(2024, 2, 29, 23, 59, 59, 999999),
        completed_at=None,
        last_heartbeat_at=datetime(2025, 1, 1, 0, 0, 0),  # zero microseconds
        checkpoint_frequency_minutes=2**31 - 1,
        task_description=UNICODE * 200,
        meta=[1, "two", {"three": 3}, None],
        branch_parent_id=None,
        is_branch=True,
        branch_depth=3,
    )
    session.add_all([w1, w2])
    session.flush()
    w2.branch_parent_id = w1.id

    st1 = ref.SessionState.create_for_session(s1.id, "copilot")
    st2 = ref.SessionState(
        session_id=s1.id,
        mode="planning-control",
        conversation_history=[{"role": "user", "content": UNICODE}, {"role": "assistant", "content": ""}],
        context_variables=NESTED,
        plan_data={"steps": [], "approved": False},
        current_phase="execution",
        current_step=0,
        status="suspended",
        expires_at=datetime(2030, 6, 15, 12, 30, 45, 654321, tzinfo=UTC),
        version=7,
    )
    # Nothing but the required columns: the JSON columns are SQL NULL.
    st3 = ref.SessionState(session_id=s2.id, mode="hitl-interactive")
    session.add_all([st1, st2, st3])

    a1 = ref.ApprovalRequest(
        run_id=w2.id,
        session_id=s1.id,
        approval_type="plan_approval",
        context=NESTED,
        status="pending",
        result=None,
        expires_at=datetime(2030, 6, 15, 12, 30, 45, 654321, tzinfo=UTC),
    )
    a2 = ref.ApprovalRequest(
        run_id=w2.id,
        approval_type="custom_type_not_in_the_seed",
        context={"tool": "shell", "args": ["ls", "-la"]},
        status="resolved",
        resolution="approved",
        result="approved by ünïcödé alice",  # a JSON string at the top level
        expires_at=datetime(2020, 1, 1, 0, 0, 0, tzinfo=UTC),
        resolved_at=datetime(2020, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    )
    session.add_all([a1, a2])

    c1 = ref.ActiveConnection(task_id="task-" + "ü" * 95)
    c2 = ref.ActiveConnection(
        task_id="task_2",
        session_id=s2.id,
        server_instance="worker-1.example.org",
        last_heartbeat=datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC),
    )
    session.add_all([c1, c2])
    session.commit()
    return {
        "Session": [s1, s2],
        "WorkflowRun": [w1, w2],
        "SessionState": [st1, st2, st3],
        "ApprovalRequest": [a1, a2],
        "ActiveConnection": [c1, c2],
    }


def test_rows_written_by_sqlalchemy_are_read_by_ours(migrated_url):
    with sa_session(migrated_url) as session:
        objects = write_reference_rows(session)
        # After the commit every attribute reloads from the database: these are
        # the values as SQLAlchemy reads them back, server defaults included.
        written = {name: [snapshot(o, name) for o in objs] for name, objs in objects.items()}

    # cmbagent's models leave these to the database's DEFAULT: our DDL must have it.
    for name, key in SERVER_DEFAULTS:
        for values in written[name]:
            assert values[key] is not None, f"{getattr(ref, name).__tablename__}.{key} has no server default"

    with our_session(migrated_url) as db:
        for name, rows in written.items():
            model = getattr(ours, name)
            table = getattr(ref, name).__tablename__
            assert db.query(model).count() == len(rows), table
            for values in rows:
                obj = db.query(model).filter(model.id == values["id"]).first()
                assert obj is not None, f"{table} row {values['id']} not found"
                assert_ours_matches(obj, values, table)

        # Explicit None went in as JSON 'null', omitted JSON as SQL NULL: both are None.
        s1 = db.get(ours.Session, written["Session"][0]["id"])
        assert s1.resource_limits is None
        assert s1.meta == NESTED
        w1 = db.get(ours.WorkflowRun, written["WorkflowRun"][0]["id"])
        assert (w1.mode, w1.agent, w1.model, w1.status) == ("one_shot", "engineer", "gpt-4o", "draft")
        assert w1.is_branch is False and w1.branch_depth == 0
        assert w1.checkpoint_frequency_minutes == 10
        assert w1.meta is None and w1.task_description is None and w1.started_at is None
        w2 = db.get(ours.WorkflowRun, written["WorkflowRun"][1]["id"])
        assert w2.is_branch is True
        assert w2.branch_parent_id == w1.id
        assert w2.task_description == UNICODE * 200
        assert w2.started_at == datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC)
        assert w2.last_heartbeat_at == datetime(2025, 1, 1, tzinfo=UTC)
        st3 = db.get(ours.SessionState, written["SessionState"][2]["id"])
        assert st3.conversation_history is None and st3.context_variables is None
        assert st3.to_dict()["conversation_history"] == []
        assert st3.to_dict()["context_variables"] == {}
        a2 = db.get(ours.ApprovalRequest, written["ApprovalRequest"][1]["id"])
        assert a2.result == "approved by ünïcödé alice"

        for name in ("SessionState", "ApprovalRequest", "ActiveConnection"):
            model = getattr(ours, name)
            for values in written[name]:
                obj = db.get(model, values["id"])
                want = expected_to_dict(getattr(ref, name), values)
                assert obj.to_dict() == want, f"{getattr(ref, name).__tablename__}.to_dict()"
                for key in timestamp_keys(getattr(ref, name)):
                    if key in want and values[key] is not None:
                        assert obj.to_dict()[key].endswith("+00:00"), key


def test_our_timestamp_filters_match_sqlalchemy_rows(migrated_url):
    """Comparisons on timestamps SQLAlchemy stored (text on SQLite) select the right rows."""
    with sa_session(migrated_url) as session:
        objects = write_reference_rows(session)
        pending_id = objects["ApprovalRequest"][0].id
        resolved_id = objects["ApprovalRequest"][1].id
        branch_id = objects["WorkflowRun"][1].id
        plain_id = objects["WorkflowRun"][0].id

    exact = datetime(2030, 6, 15, 12, 30, 45, 654321, tzinfo=UTC)
    A = ours.ApprovalRequest
    W = ours.WorkflowRun

    def ids(query):
        return sorted(o.id for o in query.all())

    with our_session(migrated_url) as db:
        now = datetime.now(UTC)
        assert ids(db.query(A).filter(A.status == "pending", A.expires_at > now)) == [pending_id]
        assert ids(db.query(A).filter(A.expires_at < now)) == [resolved_id]
        # Boundaries at the microsecond: a text comparison in another format fails these.
        assert ids(db.query(A).filter(A.expires_at == exact)) == [pending_id]
        assert ids(db.query(A).filter(A.expires_at >= exact)) == [pending_id]
        assert ids(db.query(A).filter(A.expires_at <= exact)) == sorted([pending_id, resolved_id])
        assert ids(db.query(A).filter(A.expires_at > exact)) == []
        assert ids(db.query(A).filter(A.expires_at > exact - timedelta(microseconds=1))) == [pending_id]
        # The same instant in another zone, and naive (taken as UTC).
        ist = timezone(timedelta(hours=5, minutes=30))
        assert ids(db.query(A).filter(A.expires_at == exact.astimezone(ist))) == [pending_id]
        assert ids(db.query(A).filter(A.expires_at == exact.replace(tzinfo=None))) == [pending_id]
        # A value SQLAlchemy stored with a zero microsecond part.
        assert ids(db.query(W).filter(W.last_heartbeat_at == datetime(2025, 1, 1, tzinfo=UTC))) == [
            branch_id
        ]
        assert ids(db.query(W).filter(W.is_branch == True)) == [branch_id]  # noqa: E712
        assert ids(db.query(W).filter(W.is_branch == False)) == [plain_id]  # noqa: E712
        assert ids(db.query(W).filter(W.task_description.is_(None))) == [plain_id]
        assert ids(db.query(W).filter(W.started_at.isnot(None))) == [branch_id]


# --------------------------------------------------------------------------------------
# cmbagent_db writes, SQLAlchemy reads
# --------------------------------------------------------------------------------------

IST = timezone(timedelta(hours=5, minutes=30))


def write_our_rows(db):
    s1 = ours.Session(name=NAME_255, user_id=str(uuid.uuid4()), meta=NESTED, resource_limits=None)
    # Naive: taken as UTC.
    s2 = ours.Session(name="plain", status="archived", created_at=datetime(2024, 2, 29, 23, 59, 58, 123456))
    db.add_all([s1, s2])
    db.commit()

    w1 = ours.WorkflowRun(session_id=s1.id)
    db.add(w1)
    db.commit()
    w2 = ours.WorkflowRun(
        session_id=s1.id,
        project_id=str(uuid.uuid4()),
        mode="planning_and_control",
        agent="planner",
        model="claude-3-5-sonnet",
        status="executing",
        # Aware, not UTC: the instant 2024-02-29 23:59:59.999999 UTC.
        started_at=datetime(2024, 3, 1, 5, 29, 59, 999999, tzinfo=IST),
        last_heartbeat_at=datetime(2025, 1, 1, tzinfo=UTC),
        checkpoint_frequency_minutes=2**31 - 1,
        task_description=UNICODE * 200,
        meta=[1, "two", {"three": 3}, None],
        branch_parent_id=w1.id,
        is_branch=True,
        branch_depth=3,
    )
    db.add(w2)
    db.commit()

    st1 = ours.SessionState.create_for_session(s1.id, "copilot")
    st2 = ours.SessionState(
        session_id=s1.id,
        mode="planning-control",
        conversation_history=[{"role": "user", "content": UNICODE}],
        context_variables=NESTED,
        plan_data={"steps": [], "approved": False},
        current_phase="execution",
        current_step=0,
        status="suspended",
        expires_at=datetime(2030, 6, 15, 12, 30, 45, 654321, tzinfo=UTC),
        version=7,
    )
    st3 = ours.SessionState(session_id=s2.id, mode="hitl-interactive")
    a1 = ours.ApprovalRequest.create_pending(
        run_id=w2.id,
        approval_type="plan_approval",
        context=NESTED,
        timeout_seconds=300,
        session_id=s1.id,
    )
    a2 = ours.ApprovalRequest(
        run_id=w2.id,
        approval_type="tool_call",
        context={"tool": "shell", "args": ["ls", "-la"]},
        status="resolved",
        resolution="approved",
        result="approved by ünïcödé alice",
        expires_at=datetime(2030, 6, 15, 12, 30, 45, 654321, tzinfo=UTC),
        resolved_at=datetime(2020, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    )
    c1 = ours.ActiveConnection(task_id="task-" + "ü" * 95)
    c2 = ours.ActiveConnection(
        task_id="task_2",
        session_id=s2.id,
        server_instance="worker-1.example.org",
        last_heartbeat=datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC),
    )
    db.add_all([st1, st2, st3, a1, a2, c1, c2])
    db.commit()
    return {
        "Session": [s1, s2],
        "WorkflowRun": [w1, w2],
        "SessionState": [st1, st2, st3],
        "ApprovalRequest": [a1, a2],
        "ActiveConnection": [c1, c2],
    }


def test_rows_written_by_ours_are_read_by_sqlalchemy(migrated_url, backend):
    before = datetime.now(UTC).replace(microsecond=0)
    with our_session(migrated_url) as db:
        objects = write_our_rows(db)
        written = {name: [snapshot(o, name) for o in objs] for name, objs in objects.items()}
    after = datetime.now(UTC) + timedelta(seconds=1)

    # Time defaults were filled in at flush, aware UTC, now-ish.
    filled = [
        ("Session", 0, "created_at"),
        ("Session", 0, "last_active_at"),
        ("Session", 1, "last_active_at"),
        ("SessionState", 0, "created_at"),
        ("SessionState", 0, "updated_at"),
        ("ApprovalRequest", 0, "created_at"),
        ("ActiveConnection", 0, "connected_at"),
        ("ActiveConnection", 0, "last_heartbeat"),
        ("ActiveConnection", 1, "connected_at"),
    ]
    for name, index, key in filled:
        value = written[name][index][key]
        assert_aware_utc(value, f"{name}.{key}")
        assert before - timedelta(seconds=5) <= value <= after, f"{name}.{key} = {value!r}"

    with sa_session(migrated_url) as session:
        for name, rows in written.items():
            ref_cls = getattr(ref, name)
            table = ref_cls.__tablename__
            assert session.query(ref_cls).count() == len(rows), table
            for values in rows:
                obj = session.get(ref_cls, values["id"])
                assert obj is not None, f"{table} row {values['id']} not found by SQLAlchemy"
                assert_reference_matches(obj, values, table)

        s1 = session.get(ref.Session, written["Session"][0]["id"])
        assert s1.name == NAME_255 and s1.meta == NESTED and s1.resource_limits is None
        s2 = session.get(ref.Session, written["Session"][1]["id"])
        assert as_utc(s2.created_at) == datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
        w1 = session.get(ref.WorkflowRun, written["WorkflowRun"][0]["id"])
        assert (w1.mode, w1.agent, w1.model, w1.status) == ("one_shot", "engineer", "gpt-4o", "draft")
        assert w1.is_branch is False and w1.branch_depth == 0 and w1.checkpoint_frequency_minutes == 10
        assert w1.meta is None and w1.started_at is None and w1.project_id is None
        w2 = session.get(ref.WorkflowRun, written["WorkflowRun"][1]["id"])
        assert as_utc(w2.started_at) == datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC)
        assert w2.is_branch is True and w2.branch_parent_id == w1.id
        assert w2.meta == [1, "two", {"three": 3}, None]
        assert w2.checkpoint_frequency_minutes == 2**31 - 1
        st1 = session.get(ref.SessionState, written["SessionState"][0]["id"])
        assert st1.to_dict()["conversation_history"] == [] and st1.context_variables == {}
        assert st1.current_phase == "init" and st1.status == "active" and st1.version == 1
        st2 = session.get(ref.SessionState, written["SessionState"][1]["id"])
        assert st2.current_step == 0 and st2.plan_data == {"steps": [], "approved": False}
        st3 = session.get(ref.SessionState, written["SessionState"][2]["id"])
        assert st3.conversation_history is None and st3.plan_data is None and st3.expires_at is None
        a1 = session.get(ref.ApprovalRequest, written["ApprovalRequest"][0]["id"])
        assert a1.status == "pending" and a1.context == NESTED and a1.result is None
        lifetime = as_utc(a1.expires_at) - as_utc(a1.created_at)
        assert abs(lifetime - timedelta(seconds=300)) < timedelta(seconds=5), lifetime
        a2 = session.get(ref.ApprovalRequest, written["ApprovalRequest"][1]["id"])
        assert a2.result == "approved by ünïcödé alice"
        c2 = session.get(ref.ActiveConnection, written["ActiveConnection"][1]["id"])
        assert as_utc(c2.last_heartbeat) == datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)

        # SQLAlchemy's own comparisons find our timestamps (on SQLite: text in its format).
        exact = datetime(2030, 6, 15, 12, 30, 45, 654321, tzinfo=UTC)
        RA, RW = ref.ApprovalRequest, ref.WorkflowRun
        assert [a.id for a in session.query(RA).filter(RA.expires_at == exact)] == [a2.id]
        assert [a.id for a in session.query(RA).filter(RA.expires_at >= exact)] == [a2.id]
        assert [a.id for a in session.query(RA).filter(RA.resolved_at < exact)] == [a2.id]
        zero_us = datetime(2025, 1, 1)
        assert [w.id for w in session.query(RW).filter(RW.last_heartbeat_at == zero_us)] == [w2.id]
        assert [w.id for w in session.query(RW).filter(RW.is_branch.is_(True))] == [w2.id]

    if backend == "sqlite":
        # SQLAlchemy's storage format: 'YYYY-MM-DD HH:MM:SS.ffffff', UTC, no offset.
        pattern = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{6})?")
        for ref_cls in ref.ALL_MODELS:
            keys = timestamp_keys(ref_cls)
            texts = stored_timestamps(migrated_url, ref_cls.__tablename__, keys)
            assert texts, ref_cls.__tablename__
            for text in texts:
                assert isinstance(text, str) and pattern.fullmatch(text), (
                    f"{ref_cls.__tablename__}: stored timestamp {text!r}"
                )
        explicit = stored_timestamps(migrated_url, "workflow_runs", ["started_at", "last_heartbeat_at"])
        assert sorted(explicit) == ["2024-02-29 23:59:59.999999", "2025-01-01 00:00:00.000000"]


def test_updates_cross_both_ways(migrated_url):
    """Changes made on one side to rows the other side wrote are seen by the other side."""
    with sa_session(migrated_url) as session:
        objects = write_reference_rows(session)
        sa_session_id = objects["Session"][0].id
        sa_state_id = objects["SessionState"][1].id
        sa_approval_id = objects["ApprovalRequest"][0].id
        old_last_active = as_utc(objects["Session"][0].last_active_at)
        old_updated_at = as_utc(objects["SessionState"][1].updated_at)
    # SQLite's CURRENT_TIMESTAMP has whole seconds: let the clock move past them.
    time.sleep(1.1)

    resolved_at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    with our_session(migrated_url) as db:
        s = db.get(ours.Session, sa_session_id)
        s.status = "archived"
        s.meta = {"archived_by": UNICODE}
        a = db.query(ours.ApprovalRequest).filter_by(id=sa_approval_id).first()
        a.status = "resolved"
        a.resolution = "modified"
        a.result = {"edited_plan": NESTED}
        a.resolved_at = resolved_at
        st = db.get(ours.SessionState, sa_state_id)
        st.current_step = 4
        st.plan_data = None
        db.commit()

    with sa_session(migrated_url) as session:
        s = session.get(ref.Session, sa_session_id)
        assert s.status == "archived" and s.meta == {"archived_by": UNICODE}
        assert as_utc(s.last_active_at) > old_last_active, "sessions.last_active_at not bumped"
        a = session.get(ref.ApprovalRequest, sa_approval_id)
        assert (a.status, a.resolution, a.result) == ("resolved", "modified", {"edited_plan": NESTED})
        assert as_utc(a.resolved_at) == resolved_at
        st = session.get(ref.SessionState, sa_state_id)
        assert st.current_step == 4 and st.plan_data is None
        assert st.context_variables == NESTED
        assert as_utc(st.updated_at) > old_updated_at, "session_states.updated_at not bumped"

        # And SQLAlchemy changes rows cmbagent_db reads in a new session.
        a.context = {"changed": ["by", "sqlalchemy", None]}
        a.expires_at = datetime(2031, 1, 1, 0, 0, 0, 5, tzinfo=UTC)
        st.status = "completed"
        session.commit()
        new_updated_at = as_utc(st.updated_at)

    with our_session(migrated_url) as db:
        a = db.get(ours.ApprovalRequest, sa_approval_id)
        assert a.context == {"changed": ["by", "sqlalchemy", None]}
        assert a.expires_at == datetime(2031, 1, 1, 0, 0, 0, 5, tzinfo=UTC)
        st = db.get(ours.SessionState, sa_state_id)
        assert st.status == "completed" and st.current_step == 4
        assert st.updated_at == new_updated_at


# --------------------------------------------------------------------------------------
# Adoption of a database SQLAlchemy created without Alembic
# --------------------------------------------------------------------------------------


def create_legacy_database(url):
    """What cmbagent's create_all left behind before migrations: two tables, rows, no Alembic."""
    python_sqlite_turn()
    engine = create_engine(sa_url(url))
    try:
        ref.Base.metadata.create_all(engine, tables=[ref.Session.__table__, ref.WorkflowRun.__table__])
        with SASession(engine) as session:
            s1 = ref.Session(name="legacy " + UNICODE, user_id="u-1", meta=NESTED)
            s2 = ref.Session(
                name="second",
                status="archived",
                created_at=datetime(2023, 12, 31, 23, 59, 59, 999999),
                resource_limits={"max_runs": 2},
            )
            session.add_all([s1, s2])
            session.flush()
            runs = [
                ref.WorkflowRun(session_id=s1.id),
                ref.WorkflowRun(
                    session_id=s1.id,
                    status="completed",
                    started_at=datetime(2024, 1, 1, 10, 0, 0, 1),
                    completed_at=datetime(2024, 1, 1, 11, 0, 0),
                    task_description=UNICODE,
                    meta={"cost": 0.1, "steps": [1, 2, 3]},
                ),
                ref.WorkflowRun(session_id=s2.id, agent="researcher", status="failed"),
            ]
            session.add_all(runs)
            session.flush()
            branch = ref.WorkflowRun(
                session_id=s1.id,
                branch_parent_id=runs[1].id,
                is_branch=True,
                branch_depth=1,
            )
            session.add(branch)
            session.commit()
            return {
                "Session": [snapshot(s, "Session") for s in (s1, s2)],
                "WorkflowRun": [snapshot(r, "WorkflowRun") for r in runs + [branch]],
            }
    finally:
        engine.dispose()


def alembic_versions(url):
    return [row[0] for row in fetch_all(url, "SELECT version_num FROM alembic_version")]


@pytest.mark.parametrize("entry", ["init_database", "get_db_session"])
def test_adopts_database_created_by_sqlalchemy(db_url, entry):
    legacy = create_legacy_database(db_url)
    before = set(table_names(db_url))
    assert {"sessions", "workflow_runs"} <= before
    assert not ((OUR_TABLES - {"sessions", "workflow_runs"}) | {"alembic_version"}) & before

    if entry == "init_database":
        assert cmbagent_db.init_database(db_url) == HEAD
    else:
        # The first session of a URL brings the database to head.
        with our_session(db_url) as db:
            assert db.query(ours.WorkflowRun).count() == 4

    assert cmbagent_db.current(db_url) == HEAD
    assert alembic_versions(db_url) == [HEAD]
    assert OUR_TABLES | {"alembic_version"} <= set(table_names(db_url))
    assert row_count(db_url, "sessions") == 2
    assert row_count(db_url, "workflow_runs") == 4
    for table in ("session_states", "approval_requests", "active_connections"):
        assert row_count(db_url, table) == 0, table

    with our_session(db_url) as db:
        for name, rows in legacy.items():
            model = getattr(ours, name)
            assert db.query(model).count() == len(rows)
            for values in rows:
                obj = db.query(model).filter(model.id == values["id"]).first()
                assert obj is not None, f"{getattr(ref, name).__tablename__} row {values['id']} lost"
                assert_ours_matches(obj, values, getattr(ref, name).__tablename__)

        # The new tables work, with foreign keys to the adopted rows.
        session_id = legacy["Session"][0]["id"]
        run_id = legacy["WorkflowRun"][1]["id"]
        state = ours.SessionState.create_for_session(session_id, "copilot", plan_data={"p": 1})
        approval = ours.ApprovalRequest.create_pending(
            run_id=run_id, approval_type="step_approval", context={"step": 2}, session_id=session_id
        )
        connection = ours.ActiveConnection(task_id="adopted-task", session_id=session_id)
        db.add_all([state, approval, connection])
        db.commit()
        new_ids = (state.id, approval.id, connection.id)

    # Running it again changes nothing.
    assert cmbagent_db.init_database(db_url) == HEAD
    assert alembic_versions(db_url) == [HEAD]
    assert row_count(db_url, "sessions") == 2
    assert row_count(db_url, "workflow_runs") == 4

    with sa_session(db_url) as session:
        assert session.get(ref.SessionState, new_ids[0]).plan_data == {"p": 1}
        assert session.get(ref.ApprovalRequest, new_ids[1]).run_id == run_id
        assert session.get(ref.ActiveConnection, new_ids[2]).session_id == session_id
        for values in legacy["WorkflowRun"]:
            assert session.get(ref.WorkflowRun, values["id"]).meta == values["meta"]


# --------------------------------------------------------------------------------------
# Timestamps read in a new session are aware
# --------------------------------------------------------------------------------------


def test_timestamps_from_a_new_session_compare_with_aware_now(migrated_url):
    """SQLAlchemy returns naive datetimes on SQLite in a new session, and
    ``loaded.expires_at > datetime.now(timezone.utc)`` raises TypeError there."""
    with our_session(migrated_url) as db:
        objects = write_our_rows(db)
        ours_ids = {name: [o.id for o in objs] for name, objs in objects.items()}
    with sa_session(migrated_url) as session:
        s = ref.Session(name="written by sqlalchemy")
        session.add(s)
        session.flush()
        run = ref.WorkflowRun(session_id=s.id, started_at=datetime.now(UTC).replace(tzinfo=None))
        session.add(run)
        session.flush()
        session.add_all(
            [
                ref.SessionState.create_for_session(s.id, "copilot"),
                ref.ApprovalRequest.create_pending(run.id, "error_recovery", {"e": 1}),
                ref.ActiveConnection(task_id="sa-task"),
            ]
        )
        session.commit()

    checked = 0
    with our_session(migrated_url) as db:
        for ref_cls in ref.ALL_MODELS:
            model = getattr(ours, ref_cls.__name__)
            rows = db.query(model).all()
            assert len(rows) == len(ours_ids[ref_cls.__name__]) + 1
            for obj in rows:
                for key in timestamp_keys(ref_cls):
                    value = getattr(obj, key)
                    if value is None:
                        continue
                    assert_aware_utc(value, f"{ref_cls.__tablename__}.{key}")
                    # Each of these raises TypeError on a naive datetime.
                    now = datetime.now(UTC)
                    assert value < now + timedelta(days=36500)
                    assert now - value > timedelta(days=-36500)
                    checked += 1

        # The seed's own checks, in a session that did not write the rows.
        approval = db.get(ours.ApprovalRequest, ours_ids["ApprovalRequest"][0])
        assert approval.expires_at > datetime.now(timezone.utc)
        assert approval.created_at <= datetime.now(timezone.utc) + timedelta(seconds=5)
        pending = (
            db.query(ours.ApprovalRequest)
            .filter(
                ours.ApprovalRequest.status == "pending",
                ours.ApprovalRequest.expires_at > datetime.now(timezone.utc),
            )
            .all()
        )
        assert len(pending) == 2
        session_row = db.get(ours.Session, ours_ids["Session"][0])
        assert timedelta(0) <= datetime.now(timezone.utc) - session_row.created_at < timedelta(minutes=10)
    assert checked >= 20


# --------------------------------------------------------------------------------------
# SQLAlchemy and cmbagent_db in one process
# --------------------------------------------------------------------------------------


def rows_seen_by_another_process(path):
    """Session names in the SQLite file, read by a separate Python process."""
    script = (
        "import sqlite3, sys; "
        "c = sqlite3.connect(sys.argv[1]); "
        "print('\\n'.join(n for (n,) in c.execute('SELECT name FROM sessions ORDER BY name')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, path], capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.split()


def test_sqlalchemy_in_the_same_process_loses_no_commit(sqlite_url):
    """cmbagent keeps SQLAlchemy for its other tables (projects, ...) in the same process and
    the same SQLite file, so Python's sqlite3 opens and closes connections there while
    cmbagent_db's pool holds its own.  Every commit of ours must stay committed."""
    cmbagent_db.init_database(sqlite_url)
    names = []
    for i in range(3):
        with our_session(sqlite_url) as db:
            db.add(ours.Session(name=f"ours-{i}"))
            db.commit()
        names.append(f"ours-{i}")
        # cmbagent's own SQLAlchemy code uses the file in between (no dispose_engines here).
        engine = create_engine(sa_url(sqlite_url))
        with engine.connect() as conn:
            seen = sorted(n for (n,) in conn.exec_driver_sql("SELECT name FROM sessions"))
        engine.dispose()
        assert seen == names, f"SQLAlchemy in the same process, after commit {i}"

    with our_session(sqlite_url) as db:
        assert sorted(s.name for s in db.query(ours.Session).all()) == names
    assert rows_seen_by_another_process(helpers.sqlite_path(sqlite_url)) == names

"""The session, query and model behaviour cmbagent's code relies on.

Every call pattern listed in API.md ("Call patterns that must work") and the session
semantics of the contract (expire_on_commit=False, identity map, dirty tracking, server
defaults, cascades, aware UTC timestamps, model helpers), run against real databases of
every backend the `migrated_url` fixture is parametrized over.
"""

import json
import os
import random
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from cmbagent_db import and_, get_db_session, not_, or_
from cmbagent_db.models import (
    ActiveConnection,
    ApprovalRequest,
    Session,
    SessionState,
    WorkflowRun,
)

from helpers import fetch_all, is_sqlite, raw_connect, row_count


UTC = timezone.utc

APPROVAL_KEYS = {
    "id",
    "run_id",
    "session_id",
    "step_id",
    "approval_type",
    "context",
    "status",
    "resolution",
    "result",
    "created_at",
    "expires_at",
    "resolved_at",
}
CONNECTION_KEYS = {
    "id",
    "task_id",
    "session_id",
    "server_instance",
    "connected_at",
    "last_heartbeat",
}
STATE_KEYS = {
    "id",
    "session_id",
    "mode",
    "conversation_history",
    "context_variables",
    "plan_data",
    "current_phase",
    "current_step",
    "status",
    "created_at",
    "updated_at",
    "version",
}

TIMESTAMP_COLUMNS = {
    Session: ("created_at", "last_active_at"),
    WorkflowRun: ("started_at", "completed_at", "last_heartbeat_at"),
    SessionState: ("created_at", "updated_at", "expires_at"),
    ApprovalRequest: ("created_at", "expires_at", "resolved_at"),
    ActiveConnection: ("connected_at", "last_heartbeat"),
}


# --------------------------------------------------------------------------- helpers


def utcnow():
    return datetime.now(UTC)


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def raw_one(url, sql, params=()):
    rows = fetch_all(url, sql, params)
    assert len(rows) == 1, rows
    return rows[0]


def as_utc(value):
    """A timestamp as read by a raw driver (text on SQLite), as an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def as_json(value):
    return json.loads(value) if isinstance(value, str) else value


def assert_aware_utc(value, what=""):
    assert isinstance(value, datetime), (what, value)
    assert value.tzinfo is not None, f"{what} is naive: {value!r}"
    assert value.utcoffset() == timedelta(0), f"{what} is not UTC: {value!r}"


def assert_between(value, low, high, what=""):
    assert_aware_utc(value, what)
    assert low <= value <= high, f"{what}={value} not in [{low}, {high}]"


def new_session(db, **kw):
    kw.setdefault("name", unique("session"))
    obj = Session(**kw)
    db.add(obj)
    return obj


def new_run(db, session, **kw):
    obj = WorkflowRun(session_id=session.id, **kw)
    db.add(obj)
    return obj


def new_approval(db, run, **kw):
    kw.setdefault("approval_type", "plan_approval")
    kw.setdefault("context", {"plan": "test plan"})
    kw.setdefault("expires_at", utcnow() + timedelta(minutes=5))
    obj = ApprovalRequest(run_id=run.id, **kw)
    db.add(obj)
    return obj


def parents(db):
    """A committed Session and WorkflowRun to hang children on."""
    s = new_session(db)
    db.commit()
    r = new_run(db, s, task_description="Test task", status="executing")
    db.commit()
    return s, r


@pytest.fixture
def open_db(migrated_url):
    """Factory of sessions on the migrated database; all closed at teardown."""
    opened = []

    def factory():
        db = get_db_session(migrated_url)
        opened.append(db)
        return db

    yield factory
    for db in opened:
        try:
            db.close()
        except Exception:  # closing twice is checked by its own test
            pass


@pytest.fixture
def db(open_db):
    return open_db()


# ------------------------------------------------------------------- seed's own checks


def test_prestage_check_counts_session_states(db_url):
    """The seed's pre-stage check, on a database no one migrated: the first session
    brings it to head, so the table exists and is empty."""
    db = get_db_session(db_url)
    try:
        count = db.query(SessionState).count()
        assert count == 0
        assert type(count) is int
        s = new_session(db)
        db.commit()
        db.add(SessionState.create_for_session(s.id, "copilot"))
        db.commit()
        assert db.query(SessionState).count() == 1
    finally:
        db.close()
    assert row_count(db_url, "session_states") == 1


def test_delete_parent_and_child_in_one_commit(db, migrated_url):
    """The seed's clean-up (tests/test_stage_2.py runs the script itself): run and session
    deleted in one commit, children first, nothing left behind."""
    s, run = parents(db)
    db.add(ApprovalRequest.create_pending(run.id, "plan_approval", {"plan": "p"}, session_id=s.id))
    db.commit()
    db.delete(run)
    db.delete(s)
    db.commit()
    db.rollback()
    db.close()
    for table in ("sessions", "workflow_runs", "approval_requests"):
        assert row_count(migrated_url, table) == 0, table


# ---------------------------------------------------------------- add / commit / delete


def test_add_commit_is_visible_to_other_sessions_and_raw(open_db, migrated_url):
    db = open_db()
    s = new_session(db, name="written", user_id="user-1", meta={"k": [1, 2]})
    db.commit()

    other = open_db().get(Session, s.id)
    assert other is not None
    assert (other.name, other.user_id, other.status, other.meta) == (
        "written",
        "user-1",
        "active",
        {"k": [1, 2]},
    )
    name, status, meta = raw_one(
        migrated_url, "SELECT name, status, meta FROM sessions WHERE id = ?", (s.id,)
    )
    assert (name, status, as_json(meta)) == ("written", "active", {"k": [1, 2]})


def test_add_all(db, migrated_url):
    s, run = parents(db)
    approvals = [
        ApprovalRequest(
            run_id=run.id,
            approval_type=t,
            context={"i": i},
            expires_at=utcnow() + timedelta(minutes=1),
        )
        for i, t in enumerate(["plan_approval", "step_approval", "tool_call"])
    ]
    conn = ActiveConnection(task_id=unique("task"), session_id=s.id)
    db.add_all(approvals + [conn])
    db.commit()
    assert row_count(migrated_url, "approval_requests") == 3
    assert row_count(migrated_url, "active_connections") == 1
    rows = fetch_all(migrated_url, "SELECT approval_type FROM approval_requests")
    types = sorted(r[0] for r in rows)
    assert types == ["plan_approval", "step_approval", "tool_call"]


def test_parent_and_child_in_one_commit_in_any_add_order(db, migrated_url):
    """The unit of work orders INSERTs by foreign key, as SQLAlchemy's does."""
    s = Session(name="parent")
    run = WorkflowRun(session_id=s.id)
    approval = ApprovalRequest(
        run_id=run.id,
        session_id=s.id,
        approval_type="plan_approval",
        context={},
        expires_at=utcnow() + timedelta(minutes=1),
    )
    db.add(approval)
    db.add(run)
    db.add(s)
    db.commit()
    assert row_count(migrated_url, "sessions") == 1
    assert row_count(migrated_url, "workflow_runs") == 1
    assert row_count(migrated_url, "approval_requests") == 1


def test_flush_is_visible_in_session_only_until_commit(open_db, migrated_url):
    db = open_db()
    other = open_db()
    assert other.query(Session).count() == 0
    s = new_session(db, name="flushed")
    db.flush()
    assert db.query(Session).filter(Session.name == "flushed").count() == 1
    assert other.query(Session).filter(Session.name == "flushed").count() == 0
    assert row_count(migrated_url, "sessions") == 0
    db.commit()
    assert other.query(Session).filter(Session.name == "flushed").count() == 1
    assert other.get(Session, s.id).name == "flushed"


def test_reads_see_other_sessions_commits(open_db):
    """A session that has only read holds no snapshot: it sees later commits."""
    reader = open_db()
    writer = open_db()
    assert reader.query(ActiveConnection).count() == 0
    writer.add(ActiveConnection(task_id="later"))
    writer.commit()
    assert reader.query(ActiveConnection).count() == 1
    assert reader.query(ActiveConnection).filter_by(task_id="later").first() is not None


def test_rollback_discards_flushed_and_pending_work(db, migrated_url):
    keep = new_session(db, name="kept")
    db.commit()
    new_session(db, name="flushed-then-rolled-back")
    db.flush()
    new_session(db, name="pending-then-rolled-back")
    keep.name = "renamed-then-rolled-back"
    db.flush()
    db.rollback()
    db.commit()
    rows = fetch_all(migrated_url, "SELECT name FROM sessions")
    assert [r[0] for r in rows] == ["kept"]
    assert db.query(Session).count() == 1


def test_delete_and_commit(open_db, migrated_url):
    db = open_db()
    a = new_session(db, name="a")
    b = new_session(db, name="b")
    db.commit()
    db.delete(a)
    db.commit()
    assert [r[0] for r in fetch_all(migrated_url, "SELECT name FROM sessions")] == ["b"]
    assert db.get(Session, a.id) is None
    assert open_db().get(Session, a.id) is None
    assert db.query(Session).all() == [b]


def test_delete_of_loaded_object_in_other_session(open_db, migrated_url):
    db = open_db()
    conn = ActiveConnection(task_id="to-delete")
    db.add(conn)
    db.commit()
    db2 = open_db()
    loaded = db2.query(ActiveConnection).filter_by(task_id="to-delete").one()
    db2.delete(loaded)
    db2.commit()
    assert row_count(migrated_url, "active_connections") == 0


# -------------------------------------------------------------------- close / with


def test_attributes_readable_after_commit_and_after_close(open_db):
    db = open_db()
    s, run = parents(db)
    approval = new_approval(db, run, session_id=s.id, context={"plan": "p"})
    db.commit()
    # expire_on_commit=False: no reload needed, values stay
    assert approval.context == {"plan": "p"}
    assert_aware_utc(approval.created_at, "created_at")
    db.close()
    assert approval.status == "pending"
    assert approval.run_id == run.id
    assert approval.session_id == s.id
    assert approval.context == {"plan": "p"}
    assert_aware_utc(approval.created_at, "created_at")
    assert_aware_utc(approval.expires_at, "expires_at")
    assert run.status == "executing"
    assert s.name.startswith("session-")
    assert approval.to_dict()["id"] == approval.id

    loaded_db = open_db()
    loaded = loaded_db.get(ApprovalRequest, approval.id)
    loaded_db.close()
    assert loaded.context == {"plan": "p"}
    assert loaded.created_at == approval.created_at


def test_close_twice_and_rollback_after_close(open_db):
    db = open_db()
    new_session(db)
    db.commit()
    db.close()
    db.close()
    db.rollback()


def test_context_manager_commits_what_is_committed(migrated_url):
    with get_db_session(migrated_url) as db:
        s = Session(name="with-commit")
        db.add(s)
        db.commit()
    assert s.name == "with-commit"
    assert raw_one(migrated_url, "SELECT name FROM sessions WHERE id = ?", (s.id,)) == (
        "with-commit",
    )


def test_context_manager_rolls_back_uncommitted_work(migrated_url):
    with get_db_session(migrated_url) as db:
        existing = Session(name="original")
        db.add(existing)
        db.commit()
    with get_db_session(migrated_url) as db:
        db.add(Session(name="never-committed"))
        loaded = db.get(Session, existing.id)
        loaded.name = "uncommitted-rename"
        db.flush()
    rows = fetch_all(migrated_url, "SELECT name FROM sessions")
    assert [r[0] for r in rows] == ["original"]
    # the write lock / row lock the flush took is released: a writer gets through
    # within a short lock timeout instead of waiting on a session nobody closed
    conn = raw_connect(migrated_url)
    try:
        cur = conn.cursor()
        if is_sqlite(migrated_url):
            cur.execute("PRAGMA busy_timeout = 2000")
            cur.execute("UPDATE sessions SET name = ? WHERE id = ?", ("raw", existing.id))
        else:
            cur.execute("SET lock_timeout = '2s'")
            cur.execute("UPDATE sessions SET name = %s WHERE id = %s", ("raw", existing.id))
        conn.commit()
    finally:
        conn.close()
    assert raw_one(migrated_url, "SELECT name FROM sessions") == ("raw",)


def test_context_manager_rolls_back_on_exception(migrated_url):
    with pytest.raises(RuntimeError, match="boom"):
        with get_db_session(migrated_url) as db:
            db.add(Session(name="doomed"))
            db.flush()
            raise RuntimeError("boom")
    assert row_count(migrated_url, "sessions") == 0


# ------------------------------------------------------------------------- queries


def test_query_terminals(db):
    q = db.query(ActiveConnection)
    assert q.count() == 0
    assert q.first() is None
    assert q.all() == []
    assert q.one_or_none() is None

    only = ActiveConnection(task_id="only", server_instance="w1")
    db.add(only)
    db.commit()
    assert db.query(ActiveConnection).count() == 1
    assert db.query(ActiveConnection).first() is only
    assert db.query(ActiveConnection).all() == [only]
    assert db.query(ActiveConnection).one() is only
    assert db.query(ActiveConnection).one_or_none() is only

    db.add(ActiveConnection(task_id="second"))
    db.commit()
    assert db.query(ActiveConnection).count() == 2
    assert len(db.query(ActiveConnection).all()) == 2
    second = db.query(ActiveConnection).filter(ActiveConnection.task_id == "second").one()
    assert second.task_id == "second"


def test_filter_with_several_criteria(db):
    s, run = parents(db)
    other_run = new_run(db, s)
    db.commit()
    target = new_approval(db, run, approval_type="step_approval")
    new_approval(db, run, approval_type="plan_approval")
    new_approval(db, other_run, approval_type="step_approval")
    db.commit()
    found = (
        db.query(ApprovalRequest)
        .filter(
            ApprovalRequest.run_id == run.id,
            ApprovalRequest.approval_type == "step_approval",
        )
        .all()
    )
    assert found == [target]
    assert (
        db.query(ApprovalRequest)
        .filter(ApprovalRequest.run_id == run.id, ApprovalRequest.approval_type == "tool_call")
        .first()
        is None
    )


def test_chained_filters(db):
    s, run = parents(db)
    base = utcnow()
    early = new_approval(db, run, expires_at=base + timedelta(minutes=1))
    late = new_approval(db, run, expires_at=base + timedelta(minutes=10))
    new_approval(db, run, expires_at=base + timedelta(minutes=20), status="resolved")
    db.commit()
    found = (
        db.query(ApprovalRequest)
        .filter(ApprovalRequest.status == "pending")
        .filter(ApprovalRequest.expires_at > base + timedelta(minutes=5))
        .all()
    )
    assert found == [late]
    found = (
        db.query(ApprovalRequest)
        .filter(ApprovalRequest.run_id == run.id)
        .filter(ApprovalRequest.status == "pending")
        .filter(ApprovalRequest.expires_at <= base + timedelta(minutes=5))
        .all()
    )
    assert found == [early]


def test_filter_by(db):
    s = new_session(db)
    db.commit()
    a = ActiveConnection(task_id="t", server_instance="w1", session_id=s.id)
    b = ActiveConnection(task_id="u", server_instance="w1")
    db.add_all([a, b])
    db.commit()
    assert db.query(ActiveConnection).filter_by(task_id="t").first() is a
    assert db.query(ActiveConnection).filter_by(task_id="nope").first() is None
    assert db.query(ActiveConnection).filter_by(server_instance="w1", task_id="u").one() is b
    assert db.query(ActiveConnection).filter_by(server_instance="w1").count() == 2
    assert db.query(ActiveConnection).filter_by(session_id=None).all() == [b]


def test_bulk_update_returns_rows_matched_and_needs_commit(open_db, migrated_url):
    db = open_db()
    s, run = parents(db)
    p1 = new_approval(db, run)
    p2 = new_approval(db, run)
    done = new_approval(db, run, status="resolved")
    db.commit()

    pending = db.query(ApprovalRequest).filter(ApprovalRequest.status == "pending")
    n = pending.update({"status": "expired"})
    assert n == 2
    # not visible to anyone else before commit
    assert open_db().query(ApprovalRequest).filter(ApprovalRequest.status == "pending").count() == 2
    # objects already loaded in the session follow the update
    assert p1.status == "expired" and p2.status == "expired"
    assert done.status == "resolved"
    db.commit()
    rows = dict(fetch_all(migrated_url, "SELECT id, status FROM approval_requests"))
    assert rows == {p1.id: "expired", p2.id: "expired", done.id: "resolved"}

    # matched, not changed: a row already holding the value still counts
    when = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    n = (
        db.query(ApprovalRequest)
        .filter(ApprovalRequest.run_id == run.id)
        .update({"status": "expired", "resolved_at": when})
    )
    assert n == 3
    db.commit()
    stored = fetch_all(migrated_url, "SELECT status, resolved_at FROM approval_requests")
    assert {(st, as_utc(ts)) for st, ts in stored} == {("expired", when)}
    nothing = db.query(ApprovalRequest).filter(ApprovalRequest.status == "nothing")
    assert nothing.update({"status": "x"}) == 0
    db.commit()


def test_bulk_update_is_lost_on_rollback(db, migrated_url):
    conn = ActiveConnection(task_id="t1", server_instance="a")
    db.add(conn)
    db.commit()
    q = db.query(ActiveConnection).filter(ActiveConnection.task_id == "t1")
    assert q.update({"server_instance": "b"}) == 1
    db.rollback()
    assert raw_one(migrated_url, "SELECT server_instance FROM active_connections") == ("a",)


def test_bulk_delete_returns_rows_deleted(open_db, migrated_url):
    db = open_db()
    gone = ActiveConnection(task_id="gone")
    kept = ActiveConnection(task_id="kept")
    db.add_all([gone, kept])
    db.commit()
    n = db.query(ActiveConnection).filter(ActiveConnection.task_id == "gone").delete()
    assert n == 1
    assert open_db().query(ActiveConnection).count() == 2  # uncommitted
    db.commit()
    assert fetch_all(migrated_url, "SELECT task_id FROM active_connections") == [("kept",)]
    # the deleted object is dropped from this session too
    assert db.get(ActiveConnection, gone.id) is None
    assert db.query(ActiveConnection).all() == [kept]
    assert db.query(ActiveConnection).filter(ActiveConnection.task_id == "gone").delete() == 0
    db.commit()


def _ordered_approvals(db, n=12):
    """n approvals whose created_at order (context["i"]) differs from insert order."""
    s, run = parents(db)
    base = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    order = list(range(n))
    random.Random(7).shuffle(order)
    made = {}
    for i in order:
        made[i] = new_approval(db, run, created_at=base + timedelta(minutes=i), context={"i": i})
        db.flush()
    db.commit()
    return made


def test_order_by_desc_limit(db):
    made = _ordered_approvals(db)
    got = (
        db.query(ApprovalRequest)
        .filter(ApprovalRequest.status == "pending")
        .order_by(ApprovalRequest.created_at.desc())
        .limit(10)
        .all()
    )
    assert [a.context["i"] for a in got] == list(range(11, 1, -1))
    assert got[0] is made[11]


def test_offset(db):
    _ordered_approvals(db)
    q = db.query(ApprovalRequest).order_by(ApprovalRequest.created_at.desc())
    assert [a.context["i"] for a in q.offset(2).limit(3).all()] == [9, 8, 7]
    # OFFSET without LIMIT (SQLite needs LIMIT -1 for this)
    assert [a.context["i"] for a in q.offset(10).all()] == [1, 0]
    assert q.offset(12).all() == []


def test_order_by_ascending(db):
    _ordered_approvals(db, n=4)
    plain = db.query(ApprovalRequest).order_by(ApprovalRequest.created_at).all()
    assert [a.context["i"] for a in plain] == [0, 1, 2, 3]
    asc = db.query(ApprovalRequest).order_by(ApprovalRequest.created_at.asc()).limit(2).all()
    assert [a.context["i"] for a in asc] == [0, 1]


def test_query_single_column_rows(db):
    ids = set()
    for i in range(3):
        c = ActiveConnection(task_id=f"t{i}")
        db.add(c)
        ids.add(c.id)
    db.commit()
    rows = db.query(ActiveConnection.id).all()
    assert len(rows) == 3
    for row in rows:
        assert len(row) == 1
        assert tuple(row) == (row[0],)
    assert {row[0] for row in rows} == ids
    # unpacking, as cmbagent writes it
    assert {i for (i,) in rows} == ids
    filtered = db.query(ActiveConnection.task_id).filter(ActiveConnection.task_id != "t1").all()
    assert sorted(r[0] for r in filtered) == ["t0", "t2"]


def test_query_timestamp_column_is_aware(db):
    db.add(ActiveConnection(task_id="ts"))
    db.commit()
    ((value,),) = db.query(ActiveConnection.connected_at).all()
    assert_aware_utc(value, "connected_at")


def test_db_get(open_db):
    db = open_db()
    s = new_session(db, name="got")
    db.commit()
    fresh = open_db()
    got = fresh.get(Session, s.id)
    assert got is not None and got.name == "got" and got.id == s.id
    assert fresh.get(Session, str(uuid.uuid4())) is None
    assert fresh.get(ApprovalRequest, s.id) is None


def _runs_with_depths(db):
    s = new_session(db)
    db.commit()
    for i in range(5):
        new_run(db, s, branch_depth=i, task_description=None if i % 2 else f"t{i}")
    db.commit()

    def depths(*criteria):
        return sorted(r.branch_depth for r in db.query(WorkflowRun).filter(*criteria).all())

    return depths


def test_comparison_operators(db):
    depths = _runs_with_depths(db)
    d = WorkflowRun.branch_depth
    assert depths(d == 2) == [2]
    assert depths(d != 2) == [0, 1, 3, 4]
    assert depths(d < 2) == [0, 1]
    assert depths(d <= 2) == [0, 1, 2]
    assert depths(d > 2) == [3, 4]
    assert depths(d >= 2) == [2, 3, 4]
    t = WorkflowRun.task_description
    assert depths(t != "t0") == [2, 4]  # SQL: NULL never equals or differs
    assert depths(t > "t0") == [2, 4]


def test_null_operators(db):
    depths = _runs_with_depths(db)
    t = WorkflowRun.task_description
    assert depths(t.is_(None)) == [1, 3]
    assert depths(t.isnot(None)) == [0, 2, 4]
    assert depths(t == None) == [1, 3]  # noqa: E711 - SQLAlchemy's IS NULL spelling
    assert db.query(WorkflowRun).filter(WorkflowRun.completed_at.is_(None)).count() == 5


def test_in_operator(db):
    depths = _runs_with_depths(db)
    assert depths(WorkflowRun.branch_depth.in_([1, 3, 7])) == [1, 3]
    assert depths(WorkflowRun.task_description.in_(["t0", "t4", "zz"])) == [0, 4]
    assert depths(WorkflowRun.status.in_(("draft",))) == [0, 1, 2, 3, 4]


def test_in_operator_with_empty_list(db):
    depths = _runs_with_depths(db)
    assert depths(WorkflowRun.branch_depth.in_([])) == []


def test_and_or_not(db):
    depths = _runs_with_depths(db)
    d = WorkflowRun.branch_depth
    t = WorkflowRun.task_description
    assert depths(and_(d >= 1, d <= 3)) == [1, 2, 3]
    assert depths(or_(d == 0, d == 4)) == [0, 4]
    assert depths(or_(and_(d >= 1, d <= 2), t == "t4")) == [1, 2, 4]
    assert depths(and_(or_(d == 0, d == 3), t.isnot(None))) == [0]
    assert depths(not_(d == 2)) == [0, 1, 3, 4]
    # or_ binds as a group next to another criterion
    assert depths(d > 0, or_(d == 1, d == 0)) == [1]


def test_datetime_filters_naive_aware_and_offset(db):
    s, run = parents(db)
    base = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    before = new_approval(db, run, expires_at=base - timedelta(seconds=1))
    after = new_approval(db, run, expires_at=base + timedelta(seconds=1))
    db.commit()

    def above(t):
        return db.query(ApprovalRequest).filter(ApprovalRequest.expires_at > t).all()

    assert above(base) == [after]
    assert above(base.replace(tzinfo=None)) == [after]  # naive = UTC
    plus_two = timezone(timedelta(hours=2))
    assert above(base.astimezone(plus_two)) == [after]  # same instant
    minus_five = timezone(timedelta(hours=-5))
    earlier = (base - timedelta(seconds=2)).astimezone(minus_five)
    assert {a.id for a in above(earlier)} == {before.id, after.id}
    at_or_before = ApprovalRequest.expires_at <= base.astimezone(minus_five)
    assert db.query(ApprovalRequest).filter(at_or_before).all() == [before]


# ------------------------------------------------------------------ identity map


def test_identity_map(open_db):
    db = open_db()
    s = new_session(db)
    db.commit()
    assert db.get(Session, s.id) is s
    assert db.query(Session).filter(Session.id == s.id).first() is s
    assert db.query(Session).all()[0] is s
    assert db.query(Session).filter_by(id=s.id).one() is s

    other = open_db()
    a = other.get(Session, s.id)
    b = other.query(Session).filter(Session.name == s.name).one()
    assert a is b
    assert a is not s


def test_identity_map_keeps_unflushed_changes(db):
    s = new_session(db, name="before")
    db.commit()
    s.name = "in-memory"
    again = db.query(Session).filter(Session.id == s.id).one()
    assert again is s
    assert again.name == "in-memory"
    db.commit()
    assert db.query(Session).filter(Session.name == "in-memory").one() is s


def test_refresh_and_expunge(open_db, migrated_url):
    db = open_db()
    s = new_session(db, name="v1")
    db.commit()
    fetch_all(migrated_url, "UPDATE sessions SET name = ? WHERE id = ?", ("v2", s.id))
    db.refresh(s)
    assert s.name == "v2"
    db.expunge(s)
    fetched = db.get(Session, s.id)
    assert fetched is not s
    assert fetched.name == "v2"
    s.name = "ignored-after-expunge"
    db.commit()
    assert raw_one(migrated_url, "SELECT name FROM sessions") == ("v2",)
    db.expunge_all()
    assert db.get(Session, s.id) is not fetched


# ----------------------------------------------------------------- dirty tracking


def test_assignment_after_commit_is_written_by_next_commit(open_db, migrated_url):
    db = open_db()
    s = new_session(db, name="n1")
    db.commit()
    s.status = "archived"
    db.commit()
    assert open_db().get(Session, s.id).status == "archived"
    assert fetch_all(migrated_url, "SELECT status FROM sessions") == [("archived",)]

    s.name = "n2"
    s.meta = {"tags": ["a", "b"]}
    s.user_id = "user-9"
    db.commit()
    fresh = open_db().get(Session, s.id)
    assert (fresh.name, fresh.meta, fresh.user_id, fresh.status) == (
        "n2",
        {"tags": ["a", "b"]},
        "user-9",
        "archived",
    )
    name, meta = raw_one(migrated_url, "SELECT name, meta FROM sessions WHERE id = ?", (s.id,))
    assert (name, as_json(meta)) == ("n2", {"tags": ["a", "b"]})

    s.user_id = None
    db.commit()
    assert raw_one(migrated_url, "SELECT user_id FROM sessions WHERE id = ?", (s.id,)) == (None,)


def test_assignment_to_queried_object_is_written(open_db, migrated_url):
    db = open_db()
    s, run = parents(db)
    a = new_approval(db, run)
    db.commit()

    db2 = open_db()
    loaded = db2.query(ApprovalRequest).filter(ApprovalRequest.id == a.id).first()
    resolved = datetime(2031, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
    loaded.status = "resolved"
    loaded.resolution = "approved"
    loaded.result = {"feedback": "ok", "n": 1}
    loaded.resolved_at = resolved
    db2.commit()

    status, resolution, result, resolved_at = raw_one(
        migrated_url,
        "SELECT status, resolution, result, resolved_at FROM approval_requests WHERE id = ?",
        (a.id,),
    )
    assert (status, resolution, as_json(result), as_utc(resolved_at)) == (
        "resolved",
        "approved",
        {"feedback": "ok", "n": 1},
        resolved,
    )
    third = open_db().get(ApprovalRequest, a.id)
    assert (third.status, third.resolution, third.result, third.resolved_at) == (
        "resolved",
        "approved",
        {"feedback": "ok", "n": 1},
        resolved,
    )


def test_assignment_between_flush_and_commit(db, migrated_url):
    run_session = new_session(db)
    db.commit()
    run = new_run(db, run_session)
    db.flush()
    run.status = "planning"
    db.flush()
    run.status = "executing"
    run.started_at = datetime(2030, 1, 1, tzinfo=UTC)
    db.commit()
    status, started = raw_one(migrated_url, "SELECT status, started_at FROM workflow_runs")
    assert status == "executing"
    assert as_utc(started) == datetime(2030, 1, 1, tzinfo=UTC)


def test_update_writes_only_changed_columns(open_db, migrated_url):
    db = open_db()
    s = new_session(db, name="original", user_id="u1")
    db.commit()
    # another writer changes a different column in between
    fetch_all(migrated_url, "UPDATE sessions SET name = ?", ("changed-elsewhere",))
    s.status = "archived"
    db.commit()
    assert raw_one(migrated_url, "SELECT name, status, user_id FROM sessions") == (
        "changed-elsewhere",
        "archived",
        "u1",
    )


def test_update_writes_only_changed_columns_json(open_db, migrated_url):
    db = open_db()
    s, run = parents(db)
    a = new_approval(db, run, context={"v": 1})
    db.commit()
    other = open_db()
    theirs = other.get(ApprovalRequest, a.id)
    theirs.context = {"v": 2}
    theirs.resolution = "modified"
    other.commit()
    a.status = "resolved"
    db.commit()
    status, resolution, context = raw_one(
        migrated_url, "SELECT status, resolution, context FROM approval_requests"
    )
    assert (status, resolution, as_json(context)) == ("resolved", "modified", {"v": 2})


def test_unchanged_object_is_not_written(open_db, migrated_url):
    """Loading and committing without assignments issues no UPDATE: a concurrent change
    and the row's onupdate timestamp stay as they are."""
    db = open_db()
    old = datetime(2020, 1, 1, tzinfo=UTC)
    s = new_session(db, name="same", last_active_at=old)
    db.commit()
    fetch_all(migrated_url, "UPDATE sessions SET name = ? WHERE id = ?", ("elsewhere", s.id))
    db.commit()
    name, last_active = raw_one(migrated_url, "SELECT name, last_active_at FROM sessions")
    assert name == "elsewhere"
    assert as_utc(last_active) == old


# ------------------------------------------------------------ defaults and timestamps


def test_defaults_at_construction(db):
    s = Session(name="defaults")
    assert isinstance(s.id, str) and len(s.id) == 36
    assert uuid.UUID(s.id).version == 4
    assert s.status == "active"
    assert Session(name="other").id != s.id

    run = WorkflowRun(session_id=s.id)
    assert isinstance(run.id, str) and len(run.id) == 36
    assert (run.mode, run.agent, run.model) == ("one_shot", "engineer", "gpt-4o")
    assert run.status == "draft"
    assert run.checkpoint_frequency_minutes == 10
    assert run.is_branch is False
    assert run.branch_depth == 0

    state = SessionState(session_id=s.id, mode="copilot")
    assert len(state.id) == 36
    assert state.status == "active"
    assert state.version == 1

    approval = ApprovalRequest(
        run_id=run.id, approval_type="plan_approval", context={}, expires_at=utcnow()
    )
    assert len(approval.id) == 36
    assert approval.status == "pending"
    assert approval.created_at is None  # server default, filled in at flush

    conn = ActiveConnection(task_id="defaults")
    assert len(conn.id) == 36
    assert conn.connected_at is None and conn.last_heartbeat is None

    # explicit values win over defaults
    explicit = WorkflowRun(
        session_id=s.id,
        mode="planning_control",
        agent="researcher",
        model="o3",
        status="paused",
        branch_depth=2,
        is_branch=True,
        checkpoint_frequency_minutes=3,
    )
    assert explicit.mode == "planning_control"
    assert (explicit.agent, explicit.model) == ("researcher", "o3")
    assert explicit.status == "paused"
    assert explicit.branch_depth == 2
    assert explicit.is_branch is True
    assert explicit.checkpoint_frequency_minutes == 3


def test_defaults_are_stored(open_db, migrated_url):
    db = open_db()
    s = new_session(db)
    db.commit()
    run = new_run(db, s)
    db.commit()
    row = raw_one(
        migrated_url,
        "SELECT mode, agent, model, status, checkpoint_frequency_minutes, is_branch, branch_depth"
        " FROM workflow_runs",
    )
    assert row[:5] == ("one_shot", "engineer", "gpt-4o", "draft", 10)
    assert bool(row[5]) is False and row[6] == 0
    fresh = open_db().get(WorkflowRun, run.id)
    assert fresh.is_branch is False
    assert fresh.checkpoint_frequency_minutes == 10


def test_server_defaults_filled_in_on_flush(open_db):
    db = open_db()
    low = utcnow() - timedelta(seconds=3)
    s = new_session(db)
    db.flush()
    run = new_run(db, s)
    approval = new_approval(db, run)
    conn = ActiveConnection(task_id="srv", session_id=s.id)
    state = SessionState(session_id=s.id, mode="copilot")
    db.add_all([conn, state])
    assert approval.created_at is None
    assert state.created_at is None and state.updated_at is None
    db.flush()
    high = utcnow() + timedelta(seconds=3)
    values = {
        "sessions.created_at": s.created_at,
        "sessions.last_active_at": s.last_active_at,
        "approval_requests.created_at": approval.created_at,
        "active_connections.connected_at": conn.connected_at,
        "active_connections.last_heartbeat": conn.last_heartbeat,
        "session_states.created_at": state.created_at,
        "session_states.updated_at": state.updated_at,
    }
    for what, value in values.items():
        assert value is not None, f"{what} not filled in at flush"
        assert_between(value, low, high, what)
    db.commit()

    fresh = open_db()
    assert fresh.get(Session, s.id).created_at == s.created_at
    assert fresh.get(ApprovalRequest, approval.id).created_at == approval.created_at
    got = fresh.get(ActiveConnection, conn.id)
    assert (got.connected_at, got.last_heartbeat) == (conn.connected_at, conn.last_heartbeat)
    got_state = fresh.get(SessionState, state.id)
    assert (got_state.created_at, got_state.updated_at) == (state.created_at, state.updated_at)


def test_last_active_at_and_updated_at_bumped_on_update(open_db, migrated_url):
    db = open_db()
    old = datetime(2020, 1, 1, tzinfo=UTC)
    s = new_session(db, last_active_at=old)
    db.commit()
    state = SessionState(session_id=s.id, mode="copilot", updated_at=old)
    db.add(state)
    db.commit()
    assert s.last_active_at == old
    assert state.updated_at == old

    low = utcnow() - timedelta(seconds=3)
    s.status = "archived"
    state.current_step = 2
    db.commit()
    high = utcnow() + timedelta(seconds=3)

    assert_between(s.last_active_at, low, high, "sessions.last_active_at on the object")
    assert_between(state.updated_at, low, high, "session_states.updated_at on the object")
    (stored,) = raw_one(migrated_url, "SELECT last_active_at FROM sessions")
    assert as_utc(stored) > old + timedelta(days=365)
    (stored,) = raw_one(migrated_url, "SELECT updated_at FROM session_states")
    assert as_utc(stored) > old + timedelta(days=365)
    fresh = open_db()
    assert fresh.get(Session, s.id).last_active_at == s.last_active_at
    assert fresh.get(SessionState, state.id).updated_at == state.updated_at
    assert fresh.get(Session, s.id).created_at == s.created_at

    # an explicit assignment wins over the bump, as with SQLAlchemy's onupdate
    explicit = datetime(2021, 5, 5, tzinfo=UTC)
    s.last_active_at = explicit
    s.status = "active"
    db.commit()
    (stored,) = raw_one(migrated_url, "SELECT last_active_at FROM sessions")
    assert as_utc(stored) == explicit
    assert s.last_active_at == explicit


def test_timestamps_are_aware_utc_in_a_new_session(open_db):
    db = open_db()
    s = new_session(db)
    db.commit()
    run = new_run(
        db,
        s,
        started_at=datetime(2030, 1, 1, 1, 1, 1),
        completed_at=datetime(2030, 1, 1, 2, 2, 2, tzinfo=UTC),
        last_heartbeat_at=utcnow(),
    )
    db.commit()
    approval = new_approval(db, run, resolved_at=utcnow())
    state = SessionState(session_id=s.id, mode="copilot", expires_at=utcnow() + timedelta(hours=1))
    conn = ActiveConnection(task_id="aware")
    db.add_all([state, conn])
    db.commit()

    fresh = open_db()
    for model, obj in (
        (Session, s),
        (WorkflowRun, run),
        (SessionState, state),
        (ApprovalRequest, approval),
        (ActiveConnection, conn),
    ):
        loaded = fresh.get(model, obj.id)
        for column in TIMESTAMP_COLUMNS[model]:
            value = getattr(loaded, column)
            assert value is not None, f"{model.__name__}.{column}"
            assert_aware_utc(value, f"{model.__name__}.{column}")
            assert value == getattr(obj, column), f"{model.__name__}.{column}"
        # and through a query, not only get()
        queried = fresh.query(model).filter(model.id == obj.id).one()
        for column in TIMESTAMP_COLUMNS[model]:
            assert_aware_utc(getattr(queried, column), f"{model.__name__}.{column}")


def test_naive_datetimes_are_utc(open_db, migrated_url):
    """Even when the process's local time zone is not UTC."""
    old_tz = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        db = open_db()
        s, run = parents(db)
        naive = datetime(2030, 1, 2, 3, 4, 5, 600000)
        approval = new_approval(db, run, expires_at=naive)
        run.started_at = naive  # plain TIMESTAMP column
        db.commit()
        expected = naive.replace(tzinfo=UTC)
        assert approval.expires_at == expected
        assert_aware_utc(approval.expires_at)
        fresh = open_db()
        assert fresh.get(ApprovalRequest, approval.id).expires_at == expected
        assert fresh.get(WorkflowRun, run.id).started_at == expected
        (stored,) = raw_one(migrated_url, "SELECT expires_at FROM approval_requests")
        assert as_utc(stored) == expected
        (stored,) = raw_one(migrated_url, "SELECT started_at FROM workflow_runs")
        assert as_utc(stored) == expected
        assert fresh.query(ApprovalRequest).filter(ApprovalRequest.expires_at == naive).count() == 1
    finally:
        if old_tz is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old_tz
        time.tzset()


def test_aware_non_utc_datetimes_are_converted(open_db, migrated_url):
    db = open_db()
    s, run = parents(db)
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2030, 6, 1, 12, 0, 0, 123456, tzinfo=plus_two)
    approval = new_approval(db, run, expires_at=local)
    run.started_at = datetime(2030, 6, 1, 1, 0, tzinfo=timezone(timedelta(hours=-7, minutes=-30)))
    db.commit()
    expected = datetime(2030, 6, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert approval.expires_at == local  # same instant
    assert_aware_utc(approval.expires_at)
    fresh = open_db()
    loaded = fresh.get(ApprovalRequest, approval.id)
    assert loaded.expires_at == expected
    assert loaded.expires_at.hour == 10
    assert_aware_utc(loaded.expires_at)
    started = fresh.get(WorkflowRun, run.id).started_at
    assert started == datetime(2030, 6, 1, 8, 30, tzinfo=UTC)
    assert_aware_utc(started)
    assert started.hour == 8
    (stored,) = raw_one(migrated_url, "SELECT expires_at FROM approval_requests")
    assert as_utc(stored) == expected
    if is_sqlite(migrated_url):
        assert stored.startswith("2030-06-01 10:00:00.123456")


# ---------------------------------------------------------------------- cascades


def test_fk_cascades_through_db_delete(open_db, migrated_url):
    db = open_db()
    a = new_session(db, name="a")
    b = new_session(db, name="b")
    db.commit()
    run_a = new_run(db, a)
    run_b = new_run(db, b)
    db.commit()
    branch = new_run(db, b, branch_parent_id=run_b.id, is_branch=True, branch_depth=1)
    approval_via_run = new_approval(db, run_a, session_id=a.id)
    approval_cross = new_approval(db, run_b, session_id=a.id)
    conn = ActiveConnection(task_id="conn-a", session_id=a.id)
    state = SessionState(session_id=a.id, mode="copilot")
    db.add_all([conn, state])
    db.commit()

    db.delete(a)
    db.commit()

    url = migrated_url
    assert [r[0] for r in fetch_all(url, "SELECT name FROM sessions")] == ["b"]
    assert {r[0] for r in fetch_all(url, "SELECT id FROM workflow_runs")} == {run_b.id, branch.id}
    approvals = fetch_all(url, "SELECT id, session_id FROM approval_requests")
    assert approvals == [(approval_cross.id, None)]
    connections = fetch_all(url, "SELECT task_id, session_id FROM active_connections")
    assert connections == [("conn-a", None)]
    assert row_count(url, "session_states") == 0

    fresh = open_db()
    assert fresh.get(Session, a.id) is None
    assert fresh.get(WorkflowRun, run_a.id) is None
    assert fresh.get(ApprovalRequest, approval_via_run.id) is None
    assert fresh.get(ApprovalRequest, approval_cross.id).session_id is None
    assert fresh.get(ActiveConnection, conn.id).session_id is None
    assert fresh.get(SessionState, state.id) is None

    # deleting a run removes its approval requests and unlinks its branches
    db.delete(run_b)
    db.commit()
    assert row_count(url, "approval_requests") == 0
    assert fetch_all(url, "SELECT id, branch_parent_id FROM workflow_runs") == [(branch.id, None)]
    assert open_db().get(WorkflowRun, branch.id).branch_parent_id is None


def test_fk_cascades_seen_by_the_deleting_session(db):
    """As with SQLAlchemy's relationships: after the delete, the session that issued it
    no longer hands out cascaded children, and SET NULL children show NULL."""
    a = new_session(db, name="a")
    b = new_session(db, name="b")
    db.commit()
    run_a = new_run(db, a)
    run_b = new_run(db, b)
    db.commit()
    via_run = new_approval(db, run_a, session_id=a.id)
    cross = new_approval(db, run_b, session_id=a.id)
    conn = ActiveConnection(task_id="c", session_id=a.id)
    db.add(conn)
    db.commit()

    db.delete(a)
    db.commit()
    assert db.get(WorkflowRun, run_a.id) is None
    assert db.get(ApprovalRequest, via_run.id) is None
    assert db.query(ApprovalRequest).all() == [cross]
    assert cross.session_id is None
    # ActiveConnection has no relationship in cmbagent's models: only the database, not
    # the object in memory, has to show the SET NULL
    nulled = db.query(ActiveConnection).filter(ActiveConnection.session_id.is_(None)).all()
    assert [c.id for c in nulled] == [conn.id]


# ------------------------------------------------------------------------ to_dict


def test_approval_to_dict(open_db):
    db = open_db()
    s, run = parents(db)
    expires = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    context = {"plan": "p", "steps": [1, 2.5, True, None, "é✓"], "nested": {"a": {}}}
    approval = ApprovalRequest(
        run_id=run.id,
        session_id=s.id,
        approval_type="plan_approval",
        context=context,
        expires_at=expires,
    )
    before = approval.to_dict()
    assert set(before) == APPROVAL_KEYS
    assert before["created_at"] is None and before["resolved_at"] is None
    assert before["expires_at"] == "2030-01-02T03:04:05.678901+00:00"
    db.add(approval)
    db.commit()

    loaded = open_db().get(ApprovalRequest, approval.id)
    d = loaded.to_dict()
    assert set(d) == APPROVAL_KEYS
    assert d == {
        "id": approval.id,
        "run_id": run.id,
        "session_id": s.id,
        "step_id": None,
        "approval_type": "plan_approval",
        "context": context,
        "status": "pending",
        "resolution": None,
        "result": None,
        "created_at": loaded.created_at.isoformat(),
        "expires_at": "2030-01-02T03:04:05.678901+00:00",
        "resolved_at": None,
    }
    assert d["created_at"].endswith("+00:00")
    assert datetime.fromisoformat(d["created_at"]) == approval.created_at
    json.dumps(d)

    loaded.status = "resolved"
    loaded.resolution = "approved"
    loaded.result = {"ok": True}
    loaded.resolved_at = datetime(2030, 1, 2, 3, 5, tzinfo=UTC)
    d = loaded.to_dict()
    assert (d["status"], d["resolution"], d["result"], d["resolved_at"]) == (
        "resolved",
        "approved",
        {"ok": True},
        "2030-01-02T03:05:00+00:00",
    )


def test_connection_to_dict(open_db):
    db = open_db()
    s = new_session(db)
    db.commit()
    conn = ActiveConnection(task_id="task-1", session_id=s.id, server_instance="host-a")
    db.add(conn)
    db.commit()
    loaded = open_db().query(ActiveConnection).filter_by(task_id="task-1").one()
    d = loaded.to_dict()
    assert set(d) == CONNECTION_KEYS
    assert d == {
        "id": conn.id,
        "task_id": "task-1",
        "session_id": s.id,
        "server_instance": "host-a",
        "connected_at": loaded.connected_at.isoformat(),
        "last_heartbeat": loaded.last_heartbeat.isoformat(),
    }
    assert datetime.fromisoformat(d["connected_at"]).utcoffset() == timedelta(0)

    bare = ActiveConnection(task_id="bare")
    assert bare.to_dict() == {
        "id": bare.id,
        "task_id": "bare",
        "session_id": None,
        "server_instance": None,
        "connected_at": None,
        "last_heartbeat": None,
    }


def test_session_state_to_dict(open_db):
    db = open_db()
    s = new_session(db)
    db.commit()
    empty = SessionState(session_id=s.id, mode="copilot")
    full = SessionState(
        session_id=s.id,
        mode="planning-control",
        conversation_history=[{"role": "user", "content": "hi"}],
        context_variables={"k": 1},
        plan_data={"steps": ["a"]},
        current_phase="planning",
        current_step=3,
        status="suspended",
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
    )
    d = empty.to_dict()
    assert set(d) == STATE_KEYS
    assert d["conversation_history"] == [] and d["context_variables"] == {}
    assert d["created_at"] is None and d["updated_at"] is None
    db.add_all([empty, full])
    db.commit()

    fresh = open_db()
    e = fresh.get(SessionState, empty.id)
    d = e.to_dict()
    assert set(d) == STATE_KEYS
    assert d == {
        "id": empty.id,
        "session_id": s.id,
        "mode": "copilot",
        "conversation_history": [],
        "context_variables": {},
        "plan_data": None,
        "current_phase": None,
        "current_step": None,
        "status": "active",
        "created_at": e.created_at.isoformat(),
        "updated_at": e.updated_at.isoformat(),
        "version": 1,
    }
    f = fresh.get(SessionState, full.id)
    assert f.to_dict() == {
        "id": full.id,
        "session_id": s.id,
        "mode": "planning-control",
        "conversation_history": [{"role": "user", "content": "hi"}],
        "context_variables": {"k": 1},
        "plan_data": {"steps": ["a"]},
        "current_phase": "planning",
        "current_step": 3,
        "status": "suspended",
        "created_at": f.created_at.isoformat(),
        "updated_at": f.updated_at.isoformat(),
        "version": 1,
    }
    assert "expires_at" not in f.to_dict()


# ------------------------------------------------------------------ model helpers


def test_create_pending(open_db, migrated_url):
    db = open_db()
    s, run = parents(db)
    before = utcnow()
    approval = ApprovalRequest.create_pending(
        run_id=run.id,
        approval_type="step_approval",
        context={"step": 2},
        timeout_seconds=120,
        session_id=s.id,
    )
    after = utcnow()
    assert isinstance(approval, ApprovalRequest)
    assert approval.status == "pending"
    assert (approval.run_id, approval.session_id, approval.approval_type, approval.context) == (
        run.id,
        s.id,
        "step_approval",
        {"step": 2},
    )
    assert approval.resolution is None and approval.resolved_at is None
    assert_between(
        approval.expires_at,
        before + timedelta(seconds=120),
        after + timedelta(seconds=120),
        "expires_at",
    )
    # a factory, not a write
    db.commit()
    assert row_count(migrated_url, "approval_requests") == 0
    db.add(approval)
    db.commit()
    assert open_db().get(ApprovalRequest, approval.id).expires_at == approval.expires_at

    # positional arguments and the defaults (300 s, no session)
    before = utcnow()
    default = ApprovalRequest.create_pending(run.id, "plan_approval", {})
    after = utcnow()
    assert default.session_id is None
    assert default.context == {}
    five_minutes = timedelta(seconds=300)
    assert_between(default.expires_at, before + five_minutes, after + five_minutes)
    fractional = ApprovalRequest.create_pending(run.id, "tool_call", {"x": 1}, timeout_seconds=1.5)
    assert fractional.expires_at - default.expires_at < timedelta(seconds=-298)
    db.add_all([default, fractional])
    db.commit()
    assert row_count(migrated_url, "approval_requests") == 3


def test_create_for_session(open_db, migrated_url):
    db = open_db()
    s = new_session(db)
    db.commit()
    plain = SessionState.create_for_session(s.id, "copilot")
    assert isinstance(plain, SessionState)
    assert (plain.session_id, plain.mode) == (s.id, "copilot")
    assert plain.conversation_history == []
    assert plain.context_variables == {}
    assert plain.plan_data is None
    assert plain.current_phase == "init"
    assert plain.status == "active"
    assert plain.version == 1
    assert len(plain.id) == 36

    full = SessionState.create_for_session(
        s.id,
        "hitl-interactive",
        conversation_history=[{"role": "assistant", "content": "x"}],
        context_variables={"a": [1]},
        plan_data={"plan": True},
        current_phase="execution",
    )
    assert full.conversation_history == [{"role": "assistant", "content": "x"}]
    assert full.context_variables == {"a": [1]}
    assert full.plan_data == {"plan": True}
    assert full.current_phase == "execution"
    assert full.status == "active"

    db.commit()
    assert row_count(migrated_url, "session_states") == 0
    db.add_all([plain, full])
    db.commit()
    fresh = open_db()
    p = fresh.get(SessionState, plain.id)
    assert (p.conversation_history, p.context_variables) == ([], {})
    assert (p.current_phase, p.status) == ("init", "active")
    f = fresh.get(SessionState, full.id)
    assert f.mode == "hitl-interactive"
    assert (f.plan_data, f.context_variables) == ({"plan": True}, {"a": [1]})


@pytest.mark.parametrize(
    "make",
    [
        lambda: Session(name="r"),
        lambda: WorkflowRun(session_id=str(uuid.uuid4())),
        lambda: SessionState(session_id=str(uuid.uuid4()), mode="copilot"),
        lambda: ApprovalRequest(
            run_id=str(uuid.uuid4()), approval_type="t", context={}, expires_at=utcnow()
        ),
        lambda: ActiveConnection(task_id="r"),
    ],
    ids=["Session", "WorkflowRun", "SessionState", "ApprovalRequest", "ActiveConnection"],
)
def test_repr_names_class_and_id(make):
    obj = make()
    text = repr(obj)
    assert type(obj).__name__ in text
    assert obj.id in text


def test_object_session_names_the_open_session_tracking_an_object(db):
    from cmbagent_db import object_session

    chat = Session(name="chat")
    assert object_session(chat) is None
    db.add(chat)
    assert object_session(chat) is db
    db.commit()
    assert object_session(chat) is db  # still tracked after commit
    db.expunge(chat)
    assert object_session(chat) is None
    with pytest.raises(TypeError, match="object_session\\(\\) takes an object of the five"):
        object_session("not a model")

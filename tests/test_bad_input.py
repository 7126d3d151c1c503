"""Bad input is refused with the exception class the contract names, nothing reaches the
database, and the same session works again after `db.rollback()`.
"""

import json
import re
import uuid
from datetime import datetime, timedelta, timezone

import pytest

import cmbagent_db
from cmbagent_db import (
    DataError,
    DatabaseError,
    Error,
    IntegrityError,
    InvalidRequestError,
    MultipleResultsFound,
    NoResultFound,
    PendingRollbackError,
    StaleDataError,
    get_db_session,
)
from cmbagent_db.models import (
    ActiveConnection,
    ApprovalRequest,
    Session,
    SessionState,
    WorkflowRun,
)

from helpers import fetch_all, row_count


UTC = timezone.utc
TABLES = ("sessions", "workflow_runs", "session_states", "approval_requests", "active_connections")


# --------------------------------------------------------------------------- helpers


def utcnow():
    return datetime.now(UTC)


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def as_utc(value):
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def as_json(value):
    return json.loads(value) if isinstance(value, str) else value


def counts(url):
    return {table: row_count(url, table) for table in TABLES}


def names(column):
    """Regex for an error message naming `table.column` (or the column, quoted)."""
    return re.escape(column)


def assert_usable_after_rollback(db, url):
    """The same session, rolled back, can write and read again."""
    db.rollback()
    before = row_count(url, "sessions")
    name = unique("after-rollback")
    s = Session(name=name)
    db.add(s)
    db.commit()
    assert row_count(url, "sessions") == before + 1
    assert fetch_all(url, "SELECT id FROM sessions WHERE name = ?", (name,)) == [(s.id,)]
    assert db.query(Session).filter(Session.name == name).one() is s


def approval_kwargs(run, **kw):
    values = dict(
        run_id=run.id,
        approval_type="plan_approval",
        context={"plan": "p"},
        expires_at=utcnow() + timedelta(minutes=5),
    )
    values.update(kw)
    return values


@pytest.fixture
def db(migrated_url):
    session = get_db_session(migrated_url)
    yield session
    try:
        session.rollback()
    finally:
        session.close()


@pytest.fixture
def run(db):
    """A committed Session + WorkflowRun, for approvals to point at."""
    s = Session(name=unique("parent"))
    db.add(s)
    db.commit()
    r = WorkflowRun(session_id=s.id, status="executing")
    db.add(r)
    db.commit()
    return r


class Opaque:
    pass


BAD_JSON = [
    pytest.param({1, 2}, TypeError, id="set"),
    pytest.param(b"bytes", TypeError, id="bytes"),
    pytest.param(float("nan"), ValueError, id="nan"),
    pytest.param(Opaque(), TypeError, id="object"),
    pytest.param({"nested": [1, {2, 3}]}, TypeError, id="nested-set"),
    pytest.param({"x": [float("inf")]}, ValueError, id="nested-infinity"),
    pytest.param({(1, 2): "tuple key"}, TypeError, id="tuple-key"),
]


# ---------------------------------------------------------------- non-JSON values


@pytest.mark.parametrize("bad, exc", BAD_JSON)
def test_non_json_context_at_construction(db, run, migrated_url, bad, exc):
    before = counts(migrated_url)
    with pytest.raises(exc, match=names("approval_requests.context")):
        ApprovalRequest(**approval_kwargs(run, context=bad))
    with pytest.raises(exc, match=names("approval_requests.context")):
        ApprovalRequest.create_pending(run.id, "plan_approval", bad)
    db.commit()
    assert counts(migrated_url) == before
    assert_usable_after_rollback(db, migrated_url)


@pytest.mark.parametrize("bad, exc", BAD_JSON)
def test_non_json_context_at_assignment(db, run, migrated_url, bad, exc):
    approval = ApprovalRequest(**approval_kwargs(run, context={"ok": 1}))
    db.add(approval)
    db.commit()
    with pytest.raises(exc, match=names("approval_requests.context")):
        approval.context = bad
    assert approval.context == {"ok": 1}
    db.commit()
    ((stored,),) = fetch_all(migrated_url, "SELECT context FROM approval_requests")
    assert as_json(stored) == {"ok": 1}
    assert_usable_after_rollback(db, migrated_url)
    ((stored,),) = fetch_all(migrated_url, "SELECT context FROM approval_requests")
    assert as_json(stored) == {"ok": 1}


JSON_COLUMNS = [
    (Session, "sessions.meta"),
    (Session, "sessions.resource_limits"),
    (WorkflowRun, "workflow_runs.meta"),
    (SessionState, "session_states.context_variables"),
    (SessionState, "session_states.conversation_history"),
    (SessionState, "session_states.plan_data"),
    (ApprovalRequest, "approval_requests.result"),
]


def required_kwargs(model, run):
    return {
        Session: lambda: {"name": unique("s")},
        WorkflowRun: lambda: {"session_id": run.session_id},
        SessionState: lambda: {"session_id": run.session_id, "mode": "copilot"},
        ApprovalRequest: lambda: approval_kwargs(run),
    }[model]()


@pytest.mark.parametrize("model, column", JSON_COLUMNS, ids=[c for _, c in JSON_COLUMNS])
def test_other_json_columns_refuse_non_json(db, run, migrated_url, model, column):
    table, attr = column.split(".")
    before = counts(migrated_url)
    with pytest.raises(TypeError, match=names(column)):
        model(**required_kwargs(model, run), **{attr: {"a", "b"}})
    with pytest.raises(ValueError, match=names(column)):
        model(**required_kwargs(model, run), **{attr: {"v": float("-inf")}})
    obj = model(**required_kwargs(model, run))
    with pytest.raises(TypeError, match=names(column)):
        setattr(obj, attr, {"a", "b"})
    with pytest.raises(ValueError, match=names(column)):
        setattr(obj, attr, {"v": float("-inf")})
    db.add(obj)
    db.commit()
    after = counts(migrated_url)
    assert after[table] == before[table] + 1
    ((stored,),) = fetch_all(migrated_url, f"SELECT {attr} FROM {table} WHERE id = ?", (obj.id,))
    assert as_json(stored) in (None, [], {})  # untouched by the refused values
    assert_usable_after_rollback(db, migrated_url)


# ------------------------------------------------------------- over-long strings


@pytest.mark.parametrize("bad", ["x" * 51, "é" * 51, "plan_approval" * 4])
def test_overlong_approval_type(db, run, migrated_url, bad):
    before = counts(migrated_url)
    with pytest.raises(DataError, match=names("approval_requests.approval_type")) as info:
        ApprovalRequest(**approval_kwargs(run, approval_type=bad))
    assert isinstance(info.value, DatabaseError) and isinstance(info.value, Error)
    with pytest.raises(DataError, match=names("approval_requests.approval_type")):
        ApprovalRequest.create_pending(run.id, bad, {})
    ok = ApprovalRequest(**approval_kwargs(run, approval_type="y" * 50))
    db.add(ok)
    db.commit()
    with pytest.raises(DataError, match=names("approval_requests.approval_type")):
        ok.approval_type = bad
    assert ok.approval_type == "y" * 50
    db.commit()
    assert fetch_all(migrated_url, "SELECT approval_type FROM approval_requests") == [("y" * 50,)]
    after = counts(migrated_url)
    assert after["approval_requests"] == before["approval_requests"] + 1
    assert_usable_after_rollback(db, migrated_url)


def test_length_counts_characters_not_bytes(db, run, migrated_url):
    """50 two-byte characters fit a String(50), on SQLite as on PostgreSQL."""
    db.add(ApprovalRequest(**approval_kwargs(run, approval_type="é" * 50)))
    db.add(ActiveConnection(task_id="✓" * 100))
    db.commit()
    assert fetch_all(migrated_url, "SELECT approval_type FROM approval_requests") == [("é" * 50,)]
    assert fetch_all(migrated_url, "SELECT task_id FROM active_connections") == [("✓" * 100,)]


def test_overlong_task_id(db, migrated_url):
    before = counts(migrated_url)
    with pytest.raises(DataError, match=names("active_connections.task_id")):
        ActiveConnection(task_id="t" * 101)
    conn = ActiveConnection(task_id="t" * 100)
    db.add(conn)
    db.commit()
    with pytest.raises(DataError, match=names("active_connections.task_id")):
        conn.task_id = "u" * 101
    assert conn.task_id == "t" * 100
    db.commit()
    assert fetch_all(migrated_url, "SELECT task_id FROM active_connections") == [("t" * 100,)]
    assert row_count(migrated_url, "active_connections") == before["active_connections"] + 1
    assert_usable_after_rollback(db, migrated_url)


def test_overlong_string_in_bulk_update(db, run, migrated_url):
    """update() values are held to the same lengths (status is String(20))."""
    approval = ApprovalRequest(**approval_kwargs(run))
    db.add(approval)
    db.commit()
    with pytest.raises(DataError):
        q = db.query(ApprovalRequest).filter(ApprovalRequest.id == approval.id)
        q.update({"status": "s" * 21})
        db.commit()
    db.rollback()
    assert fetch_all(migrated_url, "SELECT status FROM approval_requests") == [("pending",)]
    assert_usable_after_rollback(db, migrated_url)


# ------------------------------------------------------------------ wrong types


WRONG_TYPES = [
    pytest.param(
        lambda run, v: SessionState(session_id=run.session_id, mode="copilot", current_step=v),
        "session_states.current_step",
        "3",
        id="str-for-current_step",
    ),
    pytest.param(
        lambda run, v: WorkflowRun(session_id=run.session_id, checkpoint_frequency_minutes=v),
        "workflow_runs.checkpoint_frequency_minutes",
        "10",
        id="str-for-checkpoint_frequency_minutes",
    ),
    pytest.param(
        lambda run, v: ApprovalRequest(**approval_kwargs(run, expires_at=v)),
        "approval_requests.expires_at",
        1700000000,
        id="int-for-expires_at",
    ),
    pytest.param(
        lambda run, v: ApprovalRequest(**approval_kwargs(run, expires_at=v)),
        "approval_requests.expires_at",
        "2030-01-01T00:00:00+00:00",
        id="str-for-expires_at",
    ),
    pytest.param(
        lambda run, v: WorkflowRun(session_id=run.session_id, branch_depth=v),
        "workflow_runs.branch_depth",
        1.5,
        id="float-for-branch_depth",
    ),
    pytest.param(
        lambda run, v: Session(name=v),
        "sessions.name",
        123,
        id="int-for-name",
    ),
]


@pytest.mark.parametrize("make, column, bad", WRONG_TYPES)
def test_wrong_type_at_construction(db, run, migrated_url, make, column, bad):
    before = counts(migrated_url)
    with pytest.raises(TypeError, match=names(column)):
        make(run, bad)
    db.commit()
    assert counts(migrated_url) == before
    assert_usable_after_rollback(db, migrated_url)


@pytest.mark.parametrize("make, column, bad", WRONG_TYPES)
def test_wrong_type_at_assignment(db, run, migrated_url, make, column, bad):
    table, attr = column.split(".")
    good = {
        "session_states.current_step": 3,
        "workflow_runs.checkpoint_frequency_minutes": 10,
        "approval_requests.expires_at": datetime(2030, 1, 1, tzinfo=UTC),
        "workflow_runs.branch_depth": 1,
        "sessions.name": "good-name",
    }[column]
    obj = make(run, good)
    db.add(obj)
    db.commit()
    with pytest.raises(TypeError, match=names(column)):
        setattr(obj, attr, bad)
    assert getattr(obj, attr) == good
    db.commit()
    ((stored,),) = fetch_all(migrated_url, f"SELECT {attr} FROM {table} WHERE id = ?", (obj.id,))
    if isinstance(good, datetime):
        assert as_utc(stored) == good
    else:
        assert stored == good
    assert_usable_after_rollback(db, migrated_url)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Session(name="x", bogus_column=1),
        lambda: WorkflowRun(session_id=str(uuid.uuid4()), bogus_column=1),
        lambda: SessionState(session_id=str(uuid.uuid4()), mode="copilot", bogus_column=1),
        lambda: ApprovalRequest(
            run_id=str(uuid.uuid4()),
            approval_type="t",
            context={},
            expires_at=utcnow(),
            bogus_column=1,
        ),
        lambda: ActiveConnection(task_id="t", bogus_column=1),
    ],
    ids=["Session", "WorkflowRun", "SessionState", "ApprovalRequest", "ActiveConnection"],
)
def test_unknown_keyword_to_constructor(db, migrated_url, make):
    before = counts(migrated_url)
    with pytest.raises(TypeError, match="bogus_column"):
        make()
    db.commit()
    assert counts(migrated_url) == before
    assert_usable_after_rollback(db, migrated_url)


# ----------------------------------------------------------------- API misuse


def test_unknown_column_in_filter_by(db, run, migrated_url):
    db.add(ApprovalRequest(**approval_kwargs(run)))
    db.commit()
    with pytest.raises(InvalidRequestError, match="no_such_column"):
        db.query(ApprovalRequest).filter_by(no_such_column="x").first()
    # a query error does not poison the session
    assert db.query(ApprovalRequest).count() == 1
    assert row_count(migrated_url, "approval_requests") == 1
    assert_usable_after_rollback(db, migrated_url)


def test_unknown_column_in_update(db, run, migrated_url):
    db.add(ApprovalRequest(**approval_kwargs(run)))
    db.commit()
    with pytest.raises(InvalidRequestError, match="no_such_column"):
        db.query(ApprovalRequest).update({"no_such_column": "x", "status": "expired"})
    db.rollback()
    assert fetch_all(migrated_url, "SELECT status FROM approval_requests") == [("pending",)]
    assert_usable_after_rollback(db, migrated_url)


# ---------------------------------------------------------- integrity failures


@pytest.mark.parametrize("trigger", ["commit", "flush"])
def test_missing_parent_row(db, migrated_url, trigger):
    before = counts(migrated_url)
    good = Session(name=unique("same-transaction"))
    db.add(good)
    orphan = ApprovalRequest(
        run_id=str(uuid.uuid4()),
        approval_type="plan_approval",
        context={},
        expires_at=utcnow() + timedelta(minutes=5),
    )
    db.add(orphan)
    with pytest.raises(IntegrityError) as info:
        getattr(db, trigger)()
    assert isinstance(info.value, DatabaseError)
    # nothing of the failed transaction is written, not even the valid row
    assert counts(migrated_url) == before

    for _ in range(2):  # until rollback(), not just once
        with pytest.raises(PendingRollbackError):
            db.query(Session).count()
    with pytest.raises(PendingRollbackError):
        db.commit()
    assert counts(migrated_url) == before

    db.rollback()
    assert db.query(Session).count() == before["sessions"]
    # the failed pending objects were expunged: committing writes nothing
    db.commit()
    assert counts(migrated_url) == before
    assert_usable_after_rollback(db, migrated_url)


@pytest.mark.parametrize(
    "make",
    [
        lambda: WorkflowRun(session_id=str(uuid.uuid4())),
        lambda: SessionState(session_id=str(uuid.uuid4()), mode="copilot"),
        lambda: ActiveConnection(task_id=unique("t"), session_id=str(uuid.uuid4())),
    ],
    ids=["workflow_runs.session_id", "session_states.session_id", "active_connections.session_id"],
)
def test_other_missing_parents(db, migrated_url, make):
    before = counts(migrated_url)
    db.add(make())
    with pytest.raises(IntegrityError):
        db.commit()
    assert counts(migrated_url) == before
    with pytest.raises(PendingRollbackError):
        db.query(Session).first()
    assert_usable_after_rollback(db, migrated_url)


def test_not_null_violation(db, run, migrated_url):
    before = counts(migrated_url)
    # no expires_at
    db.add(ApprovalRequest(run_id=run.id, approval_type="plan_approval", context={}))
    with pytest.raises(IntegrityError, match="expires_at"):
        db.commit()
    assert counts(migrated_url) == before
    with pytest.raises(PendingRollbackError):
        db.query(ApprovalRequest).all()
    assert_usable_after_rollback(db, migrated_url)


def test_duplicate_task_id(db, migrated_url):
    first = ActiveConnection(task_id="dup", server_instance="w1")
    first_id = first.id
    db.add(first)
    db.commit()
    db.add(ActiveConnection(task_id="dup", server_instance="w2"))
    with pytest.raises(IntegrityError, match="task_id"):
        db.commit()
    rows = fetch_all(migrated_url, "SELECT id, server_instance FROM active_connections")
    assert rows == [(first_id, "w1")]
    with pytest.raises(PendingRollbackError):
        db.query(ActiveConnection).count()
    assert_usable_after_rollback(db, migrated_url)
    assert db.query(ActiveConnection).filter_by(task_id="dup").one() is first


def test_duplicate_task_id_in_one_flush(db, migrated_url):
    db.add_all([ActiveConnection(task_id="twice"), ActiveConnection(task_id="twice")])
    with pytest.raises(IntegrityError, match="task_id"):
        db.commit()
    assert row_count(migrated_url, "active_connections") == 0
    assert_usable_after_rollback(db, migrated_url)


def test_duplicate_task_id_by_assignment(db, migrated_url):
    a = ActiveConnection(task_id="a")
    b = ActiveConnection(task_id="b")
    db.add_all([a, b])
    db.commit()
    b.task_id = "a"
    with pytest.raises(IntegrityError, match="task_id"):
        db.commit()
    rows = fetch_all(migrated_url, "SELECT task_id FROM active_connections")
    assert sorted(rows) == [("a",), ("b",)]
    assert_usable_after_rollback(db, migrated_url)


def test_update_of_vanished_row(db, migrated_url):
    conn = ActiveConnection(task_id="vanishing")
    db.add(conn)
    db.commit()
    fetch_all(migrated_url, "DELETE FROM active_connections WHERE id = ?", (conn.id,))
    conn.server_instance = "w9"
    with pytest.raises(StaleDataError):
        db.commit()
    assert row_count(migrated_url, "active_connections") == 0
    assert_usable_after_rollback(db, migrated_url)


# ------------------------------------------------------- create_pending timeout


@pytest.mark.parametrize(
    "timeout, exc",
    [
        pytest.param(-1, ValueError, id="negative"),
        pytest.param(0, ValueError, id="zero"),
        pytest.param(-0.5, ValueError, id="negative-float"),
        pytest.param(0.0, ValueError, id="zero-float"),
        pytest.param("300", TypeError, id="string"),
        pytest.param(None, TypeError, id="None"),
        pytest.param(True, TypeError, id="bool"),
    ],
)
def test_create_pending_bad_timeout(db, run, migrated_url, timeout, exc):
    before = counts(migrated_url)
    with pytest.raises(exc, match="timeout"):
        ApprovalRequest.create_pending(run.id, "plan_approval", {"x": 1}, timeout_seconds=timeout)
    with pytest.raises(exc, match="timeout"):
        ApprovalRequest.create_pending(run.id, "plan_approval", {"x": 1}, timeout)
    db.commit()
    assert counts(migrated_url) == before
    assert_usable_after_rollback(db, migrated_url)
    db.add(ApprovalRequest.create_pending(run.id, "plan_approval", {"x": 1}, timeout_seconds=1))
    db.commit()
    assert row_count(migrated_url, "approval_requests") == 1


# ------------------------------------------------------------- hostile strings


NASTY = [
    "x' OR '1'='1",
    "'; DROP TABLE approval_requests; --",
    '" OR ""="',
    "100% %s %(x)s ? ?1 $1 :name \\ \\'",
    "') OR 1=1; DELETE FROM sessions; --",
]


def test_hostile_filter_values_match_nothing(db, run, migrated_url):
    kept = [
        ApprovalRequest(**approval_kwargs(run, approval_type=t))
        for t in ("plan_approval", "tool_call")
    ]
    db.add_all(kept)
    db.add(ActiveConnection(task_id="real-task"))
    db.commit()
    before = counts(migrated_url)
    A = ApprovalRequest
    for value in NASTY:
        assert db.query(A).filter(A.approval_type == value).all() == []
        assert db.query(A).filter(A.approval_type == value).first() is None
        assert db.query(A).filter(A.status == "pending", A.approval_type == value).count() == 0
        assert db.query(A).filter_by(approval_type=value).count() == 0
        assert db.query(A).filter(A.approval_type.in_([value, value + "'"])).all() == []
        assert db.query(A).filter(A.id == value).one_or_none() is None
        assert db.get(A, value) is None
        assert db.query(ActiveConnection).filter_by(task_id=value).first() is None
        assert db.query(A).filter(A.approval_type == value).update({"status": "expired"}) == 0
        assert db.query(A).filter(A.approval_type == value).delete() == 0
        assert db.query(ActiveConnection).filter(ActiveConnection.task_id == value).delete() == 0
        db.commit()
    assert counts(migrated_url) == before
    rows = fetch_all(migrated_url, "SELECT approval_type, status FROM approval_requests")
    assert sorted(rows) == [
        ("plan_approval", "pending"),
        ("tool_call", "pending"),
    ]
    assert_usable_after_rollback(db, migrated_url)


def test_hostile_values_are_stored_verbatim(db, run, migrated_url):
    made = {}
    for i, value in enumerate(NASTY):
        approval = ApprovalRequest(
            **approval_kwargs(run, approval_type=value, context={"v": value})
        )
        approval.result = {value: [value]}
        db.add(approval)
        db.add(ActiveConnection(task_id=value, server_instance=value))
        made[value] = approval
    db.commit()
    fresh = get_db_session(migrated_url)
    try:
        for value, approval in made.items():
            same_type = fresh.query(ApprovalRequest).filter(ApprovalRequest.approval_type == value)
            got = same_type.one()
            assert got.id == approval.id
            assert got.context == {"v": value}
            assert got.result == {value: [value]}
            conn = fresh.query(ActiveConnection).filter_by(task_id=value).one()
            assert conn.server_instance == value
            assert same_type.update({"resolution": "approved"}) == 1
        fresh.commit()
    finally:
        fresh.close()
    stored = fetch_all(
        migrated_url, "SELECT approval_type, context, resolution FROM approval_requests"
    )
    assert sorted((t, as_json(c)["v"], r) for t, c, r in stored) == sorted(
        (v, v, "approved") for v in NASTY
    )
    task_ids = fetch_all(migrated_url, "SELECT task_id FROM active_connections")
    assert sorted(r[0] for r in task_ids) == sorted(NASTY)
    assert row_count(migrated_url, "sessions") == 1


# ------------------------------------------------------------- one() cardinality


def test_one_with_zero_rows(db, migrated_url):
    with pytest.raises(NoResultFound):
        db.query(ActiveConnection).one()
    with pytest.raises(NoResultFound):
        db.query(ActiveConnection).filter(ActiveConnection.task_id == "absent").one()
    assert issubclass(NoResultFound, InvalidRequestError)
    # not a flush failure: usable without rollback
    assert db.query(ActiveConnection).count() == 0
    assert_usable_after_rollback(db, migrated_url)


def test_one_with_two_rows(db, migrated_url):
    db.add_all(
        [
            ActiveConnection(task_id="a", server_instance="w"),
            ActiveConnection(task_id="b", server_instance="w"),
        ]
    )
    db.commit()
    q = db.query(ActiveConnection).filter(ActiveConnection.server_instance == "w")
    with pytest.raises(MultipleResultsFound):
        q.one()
    with pytest.raises(MultipleResultsFound):
        q.one_or_none()
    assert issubclass(MultipleResultsFound, InvalidRequestError)
    assert db.query(ActiveConnection).filter_by(task_id="a").one().task_id == "a"
    assert row_count(migrated_url, "active_connections") == 2
    assert_usable_after_rollback(db, migrated_url)


def test_exceptions_are_exported_from_the_package():
    for name in ("DataError", "IntegrityError", "InvalidRequestError", "NoResultFound",
                 "MultipleResultsFound", "PendingRollbackError", "StaleDataError"):
        assert issubclass(getattr(cmbagent_db, name), cmbagent_db.Error), name
    assert issubclass(PendingRollbackError, InvalidRequestError)
    assert issubclass(IntegrityError, DatabaseError)
    assert issubclass(DataError, DatabaseError)

"""Joins and queries of several models, on every backend.

``query(A, B)``, ``query(A.x, B.y)``, ``.join(B, on)`` and ``.join(B)`` along the foreign
key, ``.outerjoin``, filters and ordering on joined columns, ``distinct()``, ``func``
aggregates with ``group_by``, and ``aliased()`` self-joins; cmbagent's list-of-sessions
query is compared with SQLAlchemy on the same rows.
"""

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session as SASession

import cmbagent_db
import reference_models as ref
from cmbagent_db import InvalidRequestError, aliased, func, get_db_session
from cmbagent_db.models import ApprovalRequest, Session, SessionState, WorkflowRun

from helpers import fetch_all, sa_url

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def sessions(migrated_url):
    """Four sessions: three with a state (two active, one completed; modes differ), one
    without; the first has two runs, the second is a stage run of the first, with
    approvals 3 / 1 / 0."""
    db = get_db_session(migrated_url)
    made = []
    for i, (status, mode) in enumerate([("active", "planning"), ("active", "copilot"), ("completed", "planning"), (None, None)]):
        s = Session(name=f"s{i}", user_id="u1" if i < 3 else "u2", created_at=T0 + timedelta(hours=i))
        db.add(s)
        made.append(s)
        if status is not None:
            db.add(SessionState(session_id=s.id, mode=mode, status=status, current_phase=f"p{i}",
                                updated_at=T0 + timedelta(days=10 - i)))
    db.flush()
    top = WorkflowRun(session_id=made[0].id, status="executing", started_at=T0, branch_depth=1)
    db.add(top)
    db.flush()
    stage = WorkflowRun(session_id=made[0].id, parent_run_id=top.id, status="completed",
                        started_at=T0 + timedelta(minutes=5), branch_depth=2)
    other = WorkflowRun(session_id=made[1].id, status="draft")
    db.add_all([stage, other])
    db.flush()
    for run, n in ((top, 3), (stage, 1)):
        for k in range(n):
            db.add(ApprovalRequest.create_pending(run.id, "step", {"k": k}, session_id=run.session_id))
    db.commit()
    ids = {"sessions": [s.id for s in made], "top": top.id, "stage": stage.id, "other": other.id}
    db.close()
    return migrated_url, ids


def _utc(v):
    """Compares timestamps as UTC wall-clock times whatever tz-awareness a library gives."""
    if isinstance(v, datetime) and v.tzinfo is not None:
        return v.astimezone(timezone.utc).replace(tzinfo=None)
    return v


def list_sessions(db, S, St, user_id=None, status=None, mode=None, limit=50):
    """cmbagent's list-of-sessions query, as its session manager writes it."""
    query = db.query(
        S.id, S.name, S.created_at, S.last_active_at,
        St.mode, St.status, St.current_phase, St.updated_at,
    ).join(St, S.id == St.session_id)
    if user_id:
        query = query.filter(S.user_id == user_id)
    if status:
        query = query.filter(St.status == status)
    if mode:
        query = query.filter(St.mode == mode)
    query = query.order_by(St.updated_at.desc()).limit(limit)
    return [tuple(_utc(v) for v in row) for row in query.all()]


@pytest.mark.parametrize("filters", [{}, {"status": "active"}, {"mode": "planning"}, {"user_id": "u1", "limit": 2},
                                     {"status": "active", "mode": "copilot"}, {"user_id": "u2"}])
def test_cmbagent_list_of_sessions_returns_what_sqlalchemy_returns(sessions, filters):
    url, ids = sessions
    db = get_db_session(url)
    ours = list_sessions(db, Session, SessionState, **filters)
    db.close()
    cmbagent_db.dispose_engines()  # Python's sqlite3 reads the file next
    engine = create_engine(sa_url(url))
    try:
        with SASession(engine) as sa:
            theirs = list_sessions(sa, ref.Session, ref.SessionState, **filters)
    finally:
        engine.dispose()
    assert ours == theirs
    if not filters:
        # The session without a state is not listed; newest state first.
        assert [r[0] for r in ours] == ids["sessions"][:3]


def test_rows_of_several_models_come_through_the_identity_map(sessions):
    url, ids = sessions
    db = get_db_session(url)
    first = db.get(Session, ids["sessions"][0])
    rows = db.query(Session, SessionState).join(SessionState).order_by(Session.created_at).all()
    assert [type(r) for r in rows] == [tuple] * 3
    assert rows[0][0] is first
    assert all(state.session_id == s.id for s, state in rows)
    assert rows[1][1] is db.query(SessionState).filter(SessionState.session_id == ids["sessions"][1]).one()
    # Objects and values mixed in one row.
    row = db.query(WorkflowRun, Session.name).join(Session).filter(WorkflowRun.id == ids["stage"]).one()
    assert row[0] is db.get(WorkflowRun, ids["stage"]) and row[1] == "s0"
    assert db.query(WorkflowRun.status, Session.name).join(Session).order_by(WorkflowRun.status).first() == ("completed", "s0")
    db.close()


def test_a_query_of_one_model_returns_each_object_once_and_count_counts_rows(sessions):
    url, ids = sessions
    db = get_db_session(url)
    # Session s0 has four approvals through two runs: four joined rows, one object.
    q = db.query(Session).join(ApprovalRequest, ApprovalRequest.session_id == Session.id)
    assert [s.id for s in q.all()] == [ids["sessions"][0]]
    assert q.count() == 4
    assert db.query(Session.id).join(ApprovalRequest, ApprovalRequest.session_id == Session.id).distinct().count() == 1
    # Along the relationship and along the foreign key: the same join.
    by_rel = db.query(Session).join(Session.workflow_runs).filter(WorkflowRun.status == "draft").all()
    by_fk = db.query(Session).join(WorkflowRun).filter(WorkflowRun.status == "draft").all()
    assert by_rel == by_fk == [db.get(Session, ids["sessions"][1])]
    db.close()


def test_outerjoin_keeps_rows_without_a_match(sessions):
    url, ids = sessions
    db = get_db_session(url)
    rows = db.query(Session, SessionState).outerjoin(SessionState).order_by(Session.created_at).all()
    assert [s.id for s, _ in rows] == ids["sessions"]
    assert rows[3][1] is None and all(st is not None for _, st in rows[:3])
    counts = dict(
        db.query(WorkflowRun.id, func.count(ApprovalRequest.id))
        .outerjoin(ApprovalRequest)
        .group_by(WorkflowRun.id)
        .all()
    )
    assert counts == {ids["top"]: 3, ids["stage"]: 1, ids["other"]: 0}
    # Inner join drops the run without approvals.
    assert db.query(WorkflowRun).join(ApprovalRequest).count() == 4
    assert {r.id for r in db.query(WorkflowRun).join(ApprovalRequest)} == {ids["top"], ids["stage"]}
    db.close()


def test_aliased_self_joins_name_both_runs(sessions):
    url, ids = sessions
    db = get_db_session(url)
    parent = aliased(WorkflowRun)
    rows = db.query(WorkflowRun, parent).join(parent, parent.id == WorkflowRun.parent_run_id).all()
    assert rows == [(db.get(WorkflowRun, ids["stage"]), db.get(WorkflowRun, ids["top"]))]
    assert rows[0][1] is db.get(WorkflowRun, ids["top"])
    # Filter and order on the alias's columns; outer join keeps runs without a parent.
    q = (db.query(WorkflowRun.id, parent.status)
         .outerjoin(parent, WorkflowRun.parent_run_id == parent.id)
         .order_by(WorkflowRun.branch_depth.desc(), WorkflowRun.id))
    assert q.first() == (ids["stage"], "executing")
    assert sorted(q.all(), key=lambda r: r[0]) == sorted(
        [(ids["stage"], "executing"), (ids["top"], None), (ids["other"], None)], key=lambda r: r[0])
    assert db.query(WorkflowRun).join(parent, parent.id == WorkflowRun.parent_run_id).filter(parent.status == "executing").all() \
        == [db.get(WorkflowRun, ids["stage"])]
    # Two aliases of one table are two tables.
    grand = aliased(WorkflowRun)
    assert db.query(WorkflowRun).join(parent, parent.id == WorkflowRun.parent_run_id) \
        .join(grand, grand.id == parent.parent_run_id).count() == 0
    db.close()


def test_aggregates_group_by_distinct_and_ordering_by_an_aggregate(sessions):
    url, ids = sessions
    db = get_db_session(url)
    rows = (db.query(ApprovalRequest.run_id, func.count(ApprovalRequest.id), func.max(ApprovalRequest.created_at))
            .group_by(ApprovalRequest.run_id)
            .order_by(func.count(ApprovalRequest.id).desc())
            .all())
    assert [(r[0], r[1]) for r in rows] == [(ids["top"], 3), (ids["stage"], 1)]
    newest = db.query(ApprovalRequest).filter(ApprovalRequest.run_id == ids["top"]).order_by(ApprovalRequest.created_at.desc()).first()
    assert rows[0][2] == newest.created_at and isinstance(rows[0][2], datetime)
    assert db.query(func.count(), ApprovalRequest.status).group_by(ApprovalRequest.status).all() == [(4, "pending")]
    assert db.query(func.count(ApprovalRequest.id)).scalar() == 4
    assert db.query(func.sum(WorkflowRun.branch_depth), func.min(WorkflowRun.started_at)).one() == (3, T0)
    # Per-session dashboard: runs per state status.
    per_status = dict(db.query(SessionState.status, func.count(WorkflowRun.id))
                      .join(WorkflowRun, WorkflowRun.session_id == SessionState.session_id)
                      .group_by(SessionState.status).all())
    assert per_status == {"active": 3}
    assert sorted(db.query(WorkflowRun.session_id).distinct().all()) == sorted([(ids["sessions"][0],), (ids["sessions"][1],)])
    assert db.query(WorkflowRun.session_id).distinct().count() == 2
    db.close()


def test_joined_filters_bind_their_values(sessions):
    url, _ = sessions
    db = get_db_session(url)
    hostile = "active' OR '1'='1"
    assert db.query(Session).join(SessionState).filter(SessionState.status == hostile).all() == []
    assert db.query(Session).join(SessionState).filter(SessionState.status.in_([hostile])).count() == 0
    assert db.query(Session.name).join(SessionState).filter(SessionState.current_phase.like("p%")).count() == 3
    shown = repr(db.query(Session).join(SessionState).filter(SessionState.status == hostile))
    assert "session_states.status = " in shown and hostile not in shown
    db.close()


def test_the_older_implicit_join_through_filter(sessions):
    url, ids = sessions
    db = get_db_session(url)
    rows = db.query(ApprovalRequest.id, WorkflowRun.status).filter(ApprovalRequest.run_id == WorkflowRun.id).all()
    assert sorted(status for _, status in rows) == ["completed", "executing", "executing", "executing"]
    # A query of one model joined this way returns each object once too.
    runs = db.query(WorkflowRun).filter(ApprovalRequest.run_id == WorkflowRun.id).all()
    assert sorted(r.id for r in runs) == sorted([ids["top"], ids["stage"]])
    db.close()


def test_bad_joins_and_queries_are_clear_errors_and_lose_nothing(sessions):
    url, ids = sessions
    db = get_db_session(url)
    pending = Session(name="kept")
    db.add(pending)
    parent = aliased(WorkflowRun)
    with pytest.raises(InvalidRequestError, match="no foreign key links it to SessionState"):
        db.query(SessionState).join(WorkflowRun)
    with pytest.raises(InvalidRequestError, match="several foreign keys"):
        db.query(WorkflowRun).join(parent)
    with pytest.raises(InvalidRequestError, match="several foreign keys"):
        db.query(Session).join(ApprovalRequest).join(WorkflowRun)
    with pytest.raises(InvalidRequestError, match="joined twice"):
        db.query(Session).join(SessionState).join(SessionState)
    with pytest.raises(InvalidRequestError, match="not joined before it"):
        db.query(Session).join(SessionState, SessionState.session_id == WorkflowRun.session_id)
    with pytest.raises(TypeError, match="join\\(\\) takes a model class"):
        db.query(Session).join("session_states")
    with pytest.raises(TypeError, match="query\\(\\) takes model classes"):
        db.query(Session, "name")
    with pytest.raises(AttributeError, match="func.now is not supported"):
        func.now()
    with pytest.raises(TypeError, match="numeric column"):
        func.sum(Session.name)
    with pytest.raises(TypeError, match="group_by\\(\\) takes columns"):
        db.query(Session.name, func.count()).group_by("name")
    with pytest.raises(AttributeError, match='no column "nope"'):
        parent.nope
    with pytest.raises(TypeError, match="aliased\\(\\) takes a model class"):
        aliased(Session.id)
    with pytest.raises(InvalidRequestError, match="one model without joins"):
        db.query(Session).join(SessionState).update({"name": "x"})
    with pytest.raises(InvalidRequestError, match="one model without joins"):
        db.query(Session.name).delete()
    with pytest.raises(InvalidRequestError, match="one model without joins"):
        db.query(WorkflowRun).filter(ApprovalRequest.run_id == WorkflowRun.id).delete()
    with pytest.raises(InvalidRequestError, match="one model without joins"):
        db.query(WorkflowRun).filter(WorkflowRun.id == aliased(WorkflowRun).parent_run_id).update({"status": "x"})
    # Nothing was written, and the session goes on.
    assert fetch_all(url, "SELECT count(*) FROM sessions WHERE name = 'x'") == [(0,)]
    assert fetch_all(url, "SELECT count(*) FROM workflow_runs WHERE status = 'x'") == [(0,)]
    assert db.query(WorkflowRun).count() == 3
    db.commit()
    assert db.query(Session.name).filter(Session.id == pending.id).scalar() == "kept"
    db.close()

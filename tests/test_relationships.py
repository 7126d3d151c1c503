"""Relationship attributes on the five models, on every backend.

The names are the ones cmbagent's models and the durable-approval plan declare:
``ApprovalRequest.run`` / ``.workflow_run`` / ``.session``, ``WorkflowRun.session`` /
``.approval_requests`` (all, delete-orphan), ``Session.session_states`` /
``.workflow_runs`` (all, delete-orphan) / ``.approval_requests``, ``SessionState.session``.
"""

import logging

import pytest

from cmbagent_db import (
    InvalidRequestError,
    get_db_session,
    joinedload,
    selectinload,
)
from cmbagent_db.models import ApprovalRequest, Session, SessionState, WorkflowRun

from helpers import fetch_all


def echo_url(url):
    return url + ("&" if "?" in url else "?") + "echo=true"


def echoing_session(url):
    """A session that logs its statements; what opening it ran is logged (and can be
    cleared) once it has run one statement of its own."""
    db = get_db_session(echo_url(url))
    db.get(Session, "warm-up")
    return db


def selects(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "cmbagent_db.sql" and "SELECT" in r.getMessage()]


@pytest.fixture
def tree(migrated_url):
    """A session with two runs; the first run has three approvals, the second none."""
    db = get_db_session(migrated_url)
    s = Session(name="rel")
    db.add(s)
    r1 = WorkflowRun(session_id=s.id)
    r2 = WorkflowRun(session_id=s.id)
    db.add_all([r1, r2])
    approvals = [ApprovalRequest.create_pending(r1.id, "step", {"n": i}, session_id=s.id) for i in range(3)]
    db.add_all(approvals)
    db.commit()
    db.close()
    return migrated_url, s.id, r1.id, r2.id, sorted(a.id for a in approvals)


def test_many_to_one_loads_through_the_identity_map(tree, caplog):
    url, sid, r1, _, ids = tree
    caplog.set_level(logging.INFO, logger="cmbagent_db.sql")
    db = echoing_session(url)
    run = db.get(WorkflowRun, r1)
    approval = db.get(ApprovalRequest, ids[0])
    caplog.clear()
    # The run is tracked already: no statement at all, and the same object.
    assert approval.run is run
    assert approval.workflow_run is run
    assert selects(caplog) == []
    # The session is not: one query, then cached.
    session = approval.session
    assert isinstance(session, Session) and session.id == sid
    assert approval.session is session
    assert len(selects(caplog)) == 1
    assert run.session is session
    assert len(selects(caplog)) == 1
    db.close()


def test_a_null_key_is_none_and_assigning_sets_or_clears_the_key(tree):
    url, sid, r1, r2, ids = tree
    db = get_db_session(url)
    a = db.get(ApprovalRequest, ids[0])
    other = db.get(WorkflowRun, r2)
    a.run = other
    assert a.run_id == r2 and a.run is other and a.workflow_run is other
    a.session = None
    assert a.session_id is None and a.session is None
    db.commit()
    assert fetch_all(url, "SELECT run_id, session_id FROM approval_requests WHERE id = '%s'" % ids[0]) == [(r2, None)]
    db.close()


def test_one_to_many_collections_load_in_id_order_and_stay_in_step(tree):
    url, sid, r1, r2, ids = tree
    db = get_db_session(url)
    run = db.get(WorkflowRun, r1)
    assert [a.id for a in run.approval_requests] == ids
    assert len(db.get(WorkflowRun, r2).approval_requests) == 0
    session = db.get(Session, sid)
    assert sorted(r.id for r in session.workflow_runs) == sorted([r1, r2])
    assert [a.id for a in session.approval_requests] == ids
    assert session.session_states == []
    # Moving an approval to the other run through the many-to-one side moves it between
    # the loaded collections too (back_populates).
    other = db.get(WorkflowRun, r2)
    moved = run.approval_requests[0]
    assert len(other.approval_requests) == 0
    moved.run = other
    assert moved not in run.approval_requests
    assert list(other.approval_requests) == [moved]
    db.commit()
    assert fetch_all(url, "SELECT count(*) FROM approval_requests WHERE run_id = '%s'" % r2) == [(1,)]
    db.close()


def test_append_sets_the_key_and_adds_the_child_with_its_parent(migrated_url):
    db = get_db_session(migrated_url)
    s = Session(name="new")
    run = WorkflowRun(session=s)
    assert run.session_id == s.id and run.session is s
    state = SessionState(session_id=s.id, mode="one_shot")
    s.session_states.append(state)
    a = ApprovalRequest.create_pending("placeholder", "plan", {})
    run.approval_requests.append(a)
    assert a.run_id == run.id and a.run is run
    db.add(run)  # brings its session, and the approval it holds
    assert s in db and a in db and state in db
    db.commit()
    assert fetch_all(migrated_url, "SELECT run_id FROM approval_requests WHERE id = '%s'" % a.id) == [(run.id,)]
    assert fetch_all(migrated_url, "SELECT session_id FROM session_states WHERE id = '%s'" % state.id) == [(s.id,)]
    db.close()


def test_delete_orphan_deletes_exactly_the_removed_child(tree):
    url, sid, r1, _, ids = tree
    db = get_db_session(url)
    run = db.get(WorkflowRun, r1)
    orphan = run.approval_requests[1]
    run.approval_requests.remove(orphan)
    db.commit()
    left = [r[0] for r in fetch_all(url, "SELECT id FROM approval_requests ORDER BY id")]
    assert left == [ids[0], ids[2]]
    # Assigning a new list orphans what it leaves out.
    keep = db.get(ApprovalRequest, ids[2])
    run.approval_requests = [keep]
    db.commit()
    assert [r[0] for r in fetch_all(url, "SELECT id FROM approval_requests")] == [ids[2]]
    db.close()


def test_removing_from_a_collection_without_delete_orphan_clears_the_key(tree):
    url, sid, _, _, ids = tree
    db = get_db_session(url)
    session = db.get(Session, sid)
    a = session.approval_requests[0]
    session.approval_requests.remove(a)
    assert a.session_id is None
    db.commit()
    assert fetch_all(url, "SELECT session_id FROM approval_requests WHERE id = '%s'" % a.id) == [(None,)]
    db.close()


def test_deleting_a_run_deletes_its_loaded_and_unloaded_children(tree):
    url, sid, r1, _, ids = tree
    db = get_db_session(url)
    loaded = db.get(ApprovalRequest, ids[0])
    db.delete(db.get(WorkflowRun, r1))
    db.commit()
    assert fetch_all(url, "SELECT count(*) FROM approval_requests") == [(0,)]
    assert loaded not in db
    db.close()


def test_selectinload_and_joinedload_load_every_collection_in_one_more_query(tree, caplog):
    url, sid, r1, r2, ids = tree
    caplog.set_level(logging.INFO, logger="cmbagent_db.sql")
    for option in (selectinload, joinedload):
        db = echoing_session(url)
        caplog.clear()
        runs = db.query(WorkflowRun).options(option(WorkflowRun.approval_requests)).all()
        assert len(selects(caplog)) == 2
        counts = sorted(len(r.approval_requests) for r in runs)
        assert counts == [0, 3]
        approvals = db.query(ApprovalRequest).options(option(ApprovalRequest.session)).all()
        assert all(a.session.id == sid for a in approvals)
        assert len(selects(caplog)) == 4
        db.close()


def test_refresh_and_populate_existing_reload_collections(tree):
    url, sid, r1, _, ids = tree
    db = get_db_session(url)
    run = db.get(WorkflowRun, r1)
    assert len(run.approval_requests) == 3
    other = get_db_session(url)
    other.add(ApprovalRequest.create_pending(r1, "tool", {}))
    other.commit()
    other.close()
    db.commit()
    assert len(run.approval_requests) == 3, "expire_on_commit=False keeps what was loaded"
    db.refresh(run)
    assert len(run.approval_requests) == 4
    db.query(WorkflowRun).populate_existing().all()
    assert len(run.approval_requests) == 4
    db.close()


def test_wrong_objects_are_refused_and_nothing_is_written(tree):
    url, sid, r1, r2, ids = tree
    db = get_db_session(url)
    run = db.get(WorkflowRun, r1)
    session = db.get(Session, sid)
    with pytest.raises(TypeError, match="takes ApprovalRequest objects"):
        run.approval_requests.append(session)
    with pytest.raises(TypeError, match="takes WorkflowRun objects"):
        run.approval_requests[0].run = session
    with pytest.raises(TypeError, match="takes WorkflowRun objects"):
        ApprovalRequest(run=session)
    with pytest.raises(TypeError, match="list of objects"):
        run.approval_requests = "abc"
    # An object of another open session.
    elsewhere = get_db_session(url)
    foreign = elsewhere.get(ApprovalRequest, ids[0])
    other_run = db.get(WorkflowRun, r2)
    with pytest.raises(InvalidRequestError, match="another session"):
        other_run.approval_requests.append(foreign)
    assert foreign.run_id == r1
    assert db.dirty == []
    db.commit()
    assert fetch_all(url, "SELECT count(*) FROM approval_requests WHERE run_id = '%s'" % r1) == [(3,)]
    with pytest.raises(TypeError, match="selectinload"):
        db.query(WorkflowRun).options(selectinload(WorkflowRun.status))
    with pytest.raises(InvalidRequestError, match="not a relationship of what this query returns"):
        db.query(WorkflowRun).options(selectinload(ApprovalRequest.run))
    elsewhere.close()
    db.close()


def test_a_detached_object_keeps_what_was_loaded_and_says_what_is_not(tree):
    url, sid, r1, _, ids = tree
    db = get_db_session(url)
    run = db.get(WorkflowRun, r1)
    loaded = list(run.approval_requests)
    db.close()
    assert list(run.approval_requests) == loaded
    with pytest.raises(InvalidRequestError, match="not in an open session"):
        run.session

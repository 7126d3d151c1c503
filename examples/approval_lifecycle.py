"""The approval lifecycle as cmbagent's backend uses it, on the default database.

    python examples/approval_lifecycle.py            # cmbagent's default SQLite database
    python examples/approval_lifecycle.py URL        # any sqlite:// or postgresql:// URL

1. Bring the database to head (Alembic-compatible revisions).
2. A workflow run asks a human to approve its plan and waits (in a worker thread here; in
   cmbagent, the workflow's own thread) without holding the GIL or a transaction.
3. A web handler, possibly on another server instance, resolves the request; the waiter
   wakes at once. A second resolver loses: exactly one resolution wins.
4. A request nobody answers expires instead of hanging; the sweep marks overdue ones.
5. The instance records which WebSocket it holds, and a janitor reaps stale ones.
"""

import sys
import threading
import time

import cmbagent_db
from cmbagent_db import approvals, connections, get_db_session
from cmbagent_db.models import ApprovalRequest, Session, WorkflowRun


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else cmbagent_db.default_url()
    print(f"database: {cmbagent_db.redact_url(url)}")
    print(f"revision: {cmbagent_db.init_database(url)} (head of {cmbagent_db.history()})")

    with get_db_session(url) as db:
        session = Session(name="example: approval lifecycle")
        db.add(session)
        db.commit()
        run = WorkflowRun(session_id=session.id, task_description="fit the CMB power spectrum", status="executing")
        db.add(run)
        db.commit()

        # 2. The workflow asks for approval and waits.
        plan = approvals.request(
            db, run.id, "plan_approval", {"plan": ["load data", "fit", "plot"]},
            timeout_seconds=60, session_id=session.id,
        )
        outcome = {}

        def workflow() -> None:
            started = time.perf_counter()
            outcome["approved"] = approvals.wait(plan.id, timeout=30, url=url)
            outcome["waited"] = time.perf_counter() - started

        waiter = threading.Thread(target=workflow)
        waiter.start()
        print(f"pending for run {run.id[:8]}: {[a.approval_type for a in approvals.pending(db, run_id=run.id)]}")

        # 3. A web handler resolves it; a second, late resolver loses.
        time.sleep(0.2)
        with get_db_session(url) as handler:
            won = approvals.resolve(handler, plan.id, "approved", {"comment": "go ahead"})
            lost = approvals.resolve(handler, plan.id, "rejected")
        waiter.join()
        got = outcome["approved"]
        print(f"resolve: first {won}, second {lost}; waiter woke with {got.status}/{got.resolution} "
              f"{got.result} after {outcome['waited']:.3f}s")
        assert won and not lost and got.resolution == "approved"

        # 4. Nobody answers this one: it expires instead of hanging forever.
        step = approvals.request(db, run.id, "step_approval", {"step": 2}, timeout_seconds=0.5)
        try:
            approvals.wait(step.id, timeout=10, url=url)
        except cmbagent_db.ApprovalExpired as e:
            print(f"expired: {e}")
        overdue = approvals.request(db, run.id, "tool_call", {"tool": "shell"}, timeout_seconds=0.1)
        time.sleep(0.2)
        print(f"sweep expired {len(approvals.expire_overdue(db))} overdue request(s); "
              f"late resolve of it -> {approvals.resolve(db, overdue.id, 'approved')}")

        # 5. Connection presence across instances.
        connections.heartbeat(db, task_id=f"task-{run.id[:8]}", session_id=session.id, server_instance="worker-1")
        print(f"owner of task-{run.id[:8]}: {connections.owner(db, f'task-{run.id[:8]}', ttl_seconds=30)}; "
              f"live: {len(connections.live(db, ttl_seconds=30))}")
        print(f"reaped stale: {connections.reap_stale(db, ttl_seconds=3600)}")

        # Another session resolved the plan: populate_existing() refreshes what this one holds.
        mine = db.query(ApprovalRequest).filter(ApprovalRequest.run_id == run.id).populate_existing().all()
        statuses = {a.status for a in mine}
        print(f"approval statuses of this run: {sorted(statuses)}")

        # Clean up what the example made (ON DELETE CASCADE removes runs and approvals).
        connections.disconnect(db, f"task-{run.id[:8]}")
        db.delete(session)
        db.commit()
    print("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

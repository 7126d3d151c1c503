# test_stage_2.py
from cmbagent_db import get_db_session
from cmbagent_db.models import Session, WorkflowRun, ApprovalRequest, ActiveConnection
import uuid
from datetime import datetime, timezone, timedelta

def test_approval_requests():
    db = get_db_session()
    try:
        # Create parent records
        session = Session(id=str(uuid.uuid4()), name="Test", status="active")
        db.add(session)
        db.commit()

        run = WorkflowRun(
            id=str(uuid.uuid4()),
            session_id=session.id,
            task_description="Test task",
            status="executing"
        )
        db.add(run)
        db.commit()

        # Create approval request
        approval = ApprovalRequest.create_pending(
            run_id=run.id,
            approval_type="plan_approval",
            context={"plan": "test plan"},
            timeout_seconds=300,
            session_id=session.id
        )
        db.add(approval)
        db.commit()

        # Query back
        loaded = db.query(ApprovalRequest).filter(ApprovalRequest.run_id == run.id).first()
        assert loaded is not None
        assert loaded.status == "pending"
        assert loaded.expires_at > datetime.now(timezone.utc)
        print("✅ ApprovalRequest CRUD works")

        # Test timeout query
        pending = db.query(ApprovalRequest).filter(
            ApprovalRequest.status == "pending",
            ApprovalRequest.expires_at > datetime.now(timezone.utc)
        ).all()
        assert len(pending) == 1
        print("✅ Timeout query works")

        # Cleanup
        db.delete(run)  # Should cascade
        db.delete(session)
        db.commit()

    finally:
        db.rollback()
        db.close()

def test_active_connections():
    db = get_db_session()
    try:
        conn = ActiveConnection(
            task_id="test_task_123",
            server_instance="worker-1"
        )
        db.add(conn)
        db.commit()

        # Query by task_id
        loaded = db.query(ActiveConnection).filter(
            ActiveConnection.task_id == "test_task_123"
        ).first()
        assert loaded is not None
        print("✅ ActiveConnection CRUD works")

        # Update heartbeat
        loaded.last_heartbeat = datetime.now(timezone.utc)
        db.commit()
        print("✅ Heartbeat update works")

        # Cleanup
        db.delete(loaded)
        db.commit()

    finally:
        db.rollback()
        db.close()

if __name__ == "__main__":
    test_approval_requests()
    test_active_connections()
    print("\n✅ All Stage 2 tests passed!")

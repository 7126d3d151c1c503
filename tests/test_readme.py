"""Every ```python block of README.md runs, each on a fresh migrated database, with the few
names its prose assumes (a session, a run, a plan, a task id, and a human who approves what
is pending) provided by the harness below."""

import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import cmbagent_db
from cmbagent_db import approvals, get_db_session
from cmbagent_db.models import Session, WorkflowRun

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


class Human:
    """Approves every pending request until stopped, as a person at the UI would."""

    def __init__(self, url):
        self.url = url
        self.stop = threading.Event()
        self.approved = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        with get_db_session(self.url) as db:
            while not self.stop.wait(0.02):
                try:
                    for request in approvals.pending(db):
                        if approvals.resolve(db, request.id, "approved", {"by": "readme"}):
                            self.approved.append(request.id)
                except cmbagent_db.Error:
                    # The migrations example takes the schema down and up again meanwhile.
                    db.rollback()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(index, migrated_url, monkeypatch):
    monkeypatch.setenv("CMBAGENT_DATABASE_URL", migrated_url)
    with get_db_session(migrated_url) as db:
        session = Session(name="readme")
        db.add(session)
        db.commit()
        run = WorkflowRun(session_id=session.id, status="executing")
        db.add(run)
        db.commit()
    said = []
    namespace = {
        "url": migrated_url,
        "session_id": session.id,
        "run": run,
        "plan": ["load data", "fit", "plot"],
        "task_id": "task-readme",
        "task_ids": ["task-readme", "task-readme-2"],
        "socket": socket,
        "cmbagent_db": cmbagent_db,
        "proceed": lambda *args: said.append(("proceed", args)),
        "abort": lambda *args: said.append(("abort", args)),
        "tell_user": lambda *args: said.append(("tell_user", args)),
    }
    if "cmbagent_db.sqlalchemy" in BLOCKS[index]:
        # It declares SQLAlchemy models on the one Base, which a process can do once: a
        # process of its own per run.
        subprocess.run([sys.executable, "-c", BLOCKS[index]], check=True, timeout=120)
        return
    with Human(migrated_url) as human:
        exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    if "approvals.wait(" in BLOCKS[index]:
        # The workflow proceeded with the human's answer, and the late resolve lost.
        assert ("proceed", ("approved", {"by": "readme"})) in said, said
        assert human.approved
        assert any(kind == "tell_user" for kind, _ in said), said

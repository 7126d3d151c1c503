"""``python -m cmbagent_db``: the Alembic-shaped command line, run as a real subprocess.

Exit codes: 0 success, 1 cmbagent_db.Error (message on stderr after "error: "),
2 usage error, 3 ``check`` found drift. Database state is read back through
tests/helpers.py, not through the command line itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import urlsplit, urlunsplit

import pytest

from helpers import fetch_all, sqlite_path, table_names

REVS = ["000_base", "001_session_states", "002_approvals_connections", "003_cmbagent_columns", "004_approval_changes"]
HEAD = REVS[-1]
STAGE2 = REVS[2]
OUR_TABLES = {"sessions", "workflow_runs", "session_states", "approval_requests",
              "active_connections"}
SECRET = "Sup3rS3cretPw"


def cli(*args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    run_env = dict(os.environ)
    run_env.pop("CMBAGENT_DATABASE_URL", None)
    if env:
        run_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "cmbagent_db", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=run_env,
        stdin=subprocess.DEVNULL,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def failed(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    if code == 1:
        assert proc.stderr.startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def our_tables(url: str):
    if not os.path.exists(sqlite_path(url)):
        return set()
    return set(table_names(url)) & OUR_TABLES


def current(url: str) -> str:
    return ok(cli("--url", url, "current")).strip()


# --------------------------------------------------------------------------------------


def test_help():
    out = ok(cli("--help"))
    for word in ("current", "history", "upgrade", "downgrade", "stamp", "check", "--url"):
        assert word in out
    assert "example" in out.lower()
    for command in ("upgrade", "downgrade", "stamp", "check", "current", "history"):
        assert "usage:" in ok(cli(command, "--help"))


def test_upgrade_current_history(sqlite_url):
    assert current(sqlite_url) == ""

    out = ok(cli("--url", sqlite_url, "upgrade", "head"))
    lines = out.splitlines()
    assert len(lines) == len(REVS), out
    for line, down, rev in zip(lines, [""] + REVS, REVS):
        assert line.startswith(f"Running upgrade {down} -> {rev}, "), out
    assert our_tables(sqlite_url) == OUR_TABLES

    assert current(sqlite_url) == f"{HEAD} (head)"
    assert ok(cli("--url", sqlite_url, "upgrade")) == ""  # already at head

    history = ok(cli("history")).splitlines()
    assert len(history) == len(REVS), history
    assert history[0].startswith(f"{REVS[-2]} -> {HEAD} (head), ")
    for line, (down, rev) in zip(history[1:], list(zip(["<base>"] + REVS, REVS))[-2::-1]):
        assert line.startswith(f"{down} -> {rev}, "), history
    for line in history:
        assert line.split(", ", 1)[1].strip(), line  # a description


def test_url_after_the_command_and_from_the_environment(sqlite_url, tmp_path):
    ok(cli("upgrade", "+1", "--url", sqlite_url))
    assert current(sqlite_url) == "000_base"

    # No --url: CMBAGENT_DATABASE_URL, as cmbagent does it.
    ok(cli("upgrade", env={"CMBAGENT_DATABASE_URL": sqlite_url}))
    assert current(sqlite_url) == f"{HEAD} (head)"
    assert ok(cli("current", env={"CMBAGENT_DATABASE_URL": sqlite_url})).strip() == (
        f"{HEAD} (head)"
    )


def test_default_url_is_the_work_dir_database(tmp_path):
    work = tmp_path / "work"
    ok(cli("upgrade", env={"CMBAGENT_DEFAULT_WORK_DIR": str(work)}))
    db = work / "database" / "cmbagent.db"
    assert db.exists()
    assert set(table_names(f"sqlite:///{db}")) >= OUR_TABLES


def test_relative_and_prefix_targets(sqlite_url):
    ok(cli("--url", sqlite_url, "upgrade", "+2"))
    assert current(sqlite_url) == "001_session_states"
    out = ok(cli("--url", sqlite_url, "downgrade", "-1"))
    assert out.startswith("Running downgrade 001_session_states -> 000_base"), out
    assert current(sqlite_url) == "000_base"
    ok(cli("--url", sqlite_url, "upgrade", "002"))  # unambiguous prefix, as in Alembic
    assert current(sqlite_url) == STAGE2
    ok(cli("--url", sqlite_url, "upgrade", "+2"))
    assert current(sqlite_url) == f"{HEAD} (head)"

    # Directions are checked, like Alembic does.
    failed(cli("--url", sqlite_url, "upgrade", "000_base"))
    assert current(sqlite_url) == f"{HEAD} (head)"
    failed(cli("--url", sqlite_url, "upgrade", "-1"), 2)
    failed(cli("--url", sqlite_url, "downgrade", "+1"), 2)
    err = failed(cli("--url", sqlite_url, "upgrade", "+1"))
    assert "+1" in err
    assert current(sqlite_url) == f"{HEAD} (head)"


def test_downgrade_needs_force_to_drop_rows(sqlite_url):
    ok(cli("--url", sqlite_url, "upgrade"))
    for i in range(2):
        fetch_all(
            sqlite_url,
            "INSERT INTO active_connections (id, task_id) VALUES (?, ?)",
            (f"c{i}", f"t{i}"),
        )

    err = failed(cli("--url", sqlite_url, "downgrade", "001_session_states"))
    assert "active_connections" in err and re.search(r"\b2\b", err), err
    assert "--force" in err
    assert current(sqlite_url) == f"{HEAD} (head)"
    assert "active_connections" in our_tables(sqlite_url)

    out = ok(cli("--url", sqlite_url, "downgrade", "001_session_states", "--force"))
    assert out.startswith(f"Running downgrade {HEAD} -> {REVS[-2]}"), out
    assert current(sqlite_url) == "001_session_states"
    assert our_tables(sqlite_url) == {"sessions", "workflow_runs", "session_states"}

    out = ok(cli("--url", sqlite_url, "downgrade", "base"))
    assert out.splitlines() == [
        line for line in out.splitlines() if line.startswith("Running downgrade ")
    ]
    assert len(out.splitlines()) == 2, out
    assert current(sqlite_url) == ""
    assert our_tables(sqlite_url) == set()


def test_stamp(sqlite_url):
    out = ok(cli("--url", sqlite_url, "stamp", "head"))
    assert HEAD in out
    assert current(sqlite_url) == f"{HEAD} (head)"
    assert our_tables(sqlite_url) == set(), "stamp must not run migrations"
    assert fetch_all(sqlite_url, "SELECT version_num FROM alembic_version") == [(HEAD,)]

    ok(cli("--url", sqlite_url, "stamp", "base"))
    assert current(sqlite_url) == ""
    assert fetch_all(sqlite_url, "SELECT version_num FROM alembic_version") == []

    ok(cli("--url", sqlite_url, "stamp", "001_session_states"))
    assert current(sqlite_url) == "001_session_states"

    err = failed(cli("--url", sqlite_url, "stamp", "no_such_rev"))
    assert "no_such_rev" in err
    assert current(sqlite_url) == "001_session_states"
    failed(cli("--url", sqlite_url, "stamp"), 2)


def test_check(sqlite_url):
    ok(cli("--url", sqlite_url, "upgrade"))
    assert cli("--url", sqlite_url, "check").returncode == 0

    fetch_all(
        sqlite_url,
        "UPDATE cmbagent_db_migrations SET checksum = ? WHERE revision = ?",
        ("0" * 64, "001_session_states"),
    )
    proc = cli("--url", sqlite_url, "check")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "001_session_states" in proc.stdout
    assert "000_base" not in proc.stdout and HEAD not in proc.stdout


def test_upgrade_sql_touches_nothing(sqlite_url):
    path = Path(sqlite_path(sqlite_url))
    for args in (["upgrade", "--sql"], ["upgrade", "head", "--sql"]):
        out = ok(cli("--url", sqlite_url, *args))
        norm = " ".join(out.replace('"', "").split())
        assert re.search(r"CREATE TABLE (IF NOT EXISTS )?approval_requests\b", norm), out
        assert "alembic_version" in norm
        # SQL only: progress lines appear, if at all, as SQL comments (as Alembic's do).
        assert not any(line.startswith("Running") for line in out.splitlines()), out
        assert not path.exists(), "upgrade --sql created the database"

    ok(cli("--url", sqlite_url, "upgrade", "001_session_states"))
    before = path.read_bytes()
    out = ok(cli("--url", sqlite_url, "upgrade", "--sql", "001_session_states:head"))
    norm = " ".join(out.replace('"', "").split())
    assert re.search(r"CREATE TABLE (IF NOT EXISTS )?approval_requests\b", norm), out
    assert not re.search(r"CREATE TABLE (IF NOT EXISTS )?sessions\b", norm), out
    assert path.read_bytes() == before
    assert current(sqlite_url) == "001_session_states"

    # A range is only meaningful offline.
    failed(cli("--url", sqlite_url, "upgrade", "001_session_states:head"), 2)


def test_downgrade_sql_needs_a_range(sqlite_url):
    path = Path(sqlite_path(sqlite_url))
    out = ok(cli("--url", sqlite_url, "downgrade", "--sql", f"{HEAD}:001_session_states"))
    norm = " ".join(out.replace('"', "").split())
    assert re.search(r"DROP TABLE (IF EXISTS )?approval_requests\b", norm), out
    assert re.search(r"DROP TABLE (IF EXISTS )?active_connections\b", norm), out
    assert "'001_session_states'" in out
    assert not path.exists()

    err = failed(cli("--url", sqlite_url, "downgrade", "--sql", "001_session_states"), 2)
    assert "FROM:TO" in err or ":" in err
    assert not path.exists()


def test_bad_revision(sqlite_url):
    err = failed(cli("--url", sqlite_url, "upgrade", "no_such_rev"))
    assert "no_such_rev" in err
    assert our_tables(sqlite_url) == set()
    err = failed(cli("--url", sqlite_url, "downgrade", "no_such_rev"))
    assert "no_such_rev" in err


def test_database_from_the_future(sqlite_url):
    ok(cli("--url", sqlite_url, "upgrade"))
    fetch_all(sqlite_url, "UPDATE alembic_version SET version_num = ?", ("999_future",))
    assert "999_future" in failed(cli("--url", sqlite_url, "current"))
    assert "999_future" in failed(cli("--url", sqlite_url, "upgrade"))
    assert "999_future" in failed(cli("--url", sqlite_url, "downgrade", "base", "--force"))
    assert our_tables(sqlite_url) == OUR_TABLES
    assert fetch_all(sqlite_url, "SELECT version_num FROM alembic_version") == [("999_future",)]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["downgrade"],
        ["upgrade", "--bogus"],
        ["stamp", "a", "b"],
        ["--url"],
    ],
)
def test_usage_errors(args):
    proc = cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "usage:" in proc.stderr


def test_library_errors_exit_1(tmp_path):
    err = failed(cli("--url", "notaurl", "current"))
    assert "notaurl" in err or "URL" in err or "url" in err
    failed(cli("--url", "mysql://u@h/db", "current"))
    missing = tmp_path / "no" / "such" / "x.db"
    err = failed(cli("--url", f"sqlite:///{missing}", "upgrade"))
    assert str(missing.parent) in err
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    failed(cli("--url", f"sqlite:///{garbage}", "upgrade"))
    assert garbage.read_bytes() == b"not a database" * 100


# --------------------------------------------------------------------------------------
# Passwords never reach the terminal
# --------------------------------------------------------------------------------------


def _assert_hidden(proc: subprocess.CompletedProcess, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in proc.stderr, proc.stderr
        assert secret not in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://cmbagent:{SECRET}@127.0.0.1:1/cmbagent",  # nothing listens on port 1
        f"postgresql+psycopg2://cmbagent:{SECRET}@127.0.0.1:1/cmbagent",
        f"postgres://cmbagent:{SECRET}@127.0.0.1:1/cmbagent?connect_timeout=5",
        f"postgresql://cmbagent:{SECRET}@host:notaport/cmbagent",  # malformed
        f"postgresql://cmbagent:{SECRET}@127.0.0.1:1/cmbagent?bogus=1",  # unknown parameter
        f"mysql://cmbagent:{SECRET}@127.0.0.1/cmbagent",  # unsupported
    ],
)
def test_password_never_shown(url):
    for args in (["current"], ["upgrade"], ["downgrade", "base"], ["stamp", "head"],
                 ["check"]):
        proc = cli("--url", url, *args)
        failed(proc)
        _assert_hidden(proc, SECRET)
    proc = cli("current", env={"CMBAGENT_DATABASE_URL": url})
    failed(proc)
    _assert_hidden(proc, SECRET)


def test_password_with_special_characters_never_shown():
    url = "postgresql://cmbagent:p%40ss%2Fw0rd-Zq@127.0.0.1:1/cmbagent"
    proc = cli("--url", url, "current")
    failed(proc)
    _assert_hidden(proc, "p%40ss%2Fw0rd-Zq", "p@ss/w0rd-Zq", "w0rd-Zq")


def test_password_not_echoed_by_usage_errors():
    proc = cli(f"postgresql://cmbagent:{SECRET}@127.0.0.1:1/cmbagent")
    assert proc.returncode == 2
    _assert_hidden(proc, SECRET)
    proc = cli("upgrade", f"postgresql://cmbagent:{SECRET}@127.0.0.1:1/cmbagent", "extra")
    assert proc.returncode == 2
    _assert_hidden(proc, SECRET)


def test_password_hidden_on_a_real_server(pg_url):
    parts = urlsplit(pg_url)
    real_password = parts.password
    assert real_password
    netloc = parts.netloc.replace(f":{real_password}@", f":{SECRET}@")
    wrong_password = urlunsplit(parts._replace(netloc=netloc))
    proc = cli("--url", wrong_password, "upgrade")
    failed(proc)
    _assert_hidden(proc, SECRET)

    no_such_db = urlunsplit(parts._replace(path="/no_such_database_here"))
    proc = cli("--url", no_such_db, "current")
    failed(proc)
    _assert_hidden(proc, real_password)

    # And a working one: no password in normal output either.
    out = ok(cli("--url", pg_url, "upgrade"))
    assert real_password not in out
    assert current(pg_url) == f"{HEAD} (head)"
    proc = cli("--url", pg_url, "downgrade", "--sql", f"{HEAD}:001_session_states")
    ok(proc)
    _assert_hidden(proc, real_password)


# --------------------------------------------------------------------------------------
# main() in process
# --------------------------------------------------------------------------------------


def test_main_returns_exit_codes(sqlite_url, capsys):
    from cmbagent_db.cli import main

    assert main(["--help"]) == 0
    assert main(["nonsense"]) == 2
    assert main(["--url", sqlite_url, "upgrade", "+1"]) == 0
    assert main(["--url", sqlite_url, "current"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "000_base"
    assert main(["--url", sqlite_url, "upgrade", "no_such_rev"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_redact():
    from cmbagent_db.cli import _redact

    assert _redact(f"postgresql://u:{SECRET}@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert SECRET not in _redact(f"postgresql+psycopg://u:{SECRET}@h/db?sslmode=require")
    assert SECRET not in _redact(f"cannot reach 'postgres://u:p@{SECRET}@h/db' (timeout)")
    assert SECRET not in _redact(f"postgresql://h/db?user=u&password={SECRET}")
    assert _redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert _redact("postgresql://u@h/db") == "postgresql://u@h/db"

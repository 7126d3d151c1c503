"""Shared pytest fixtures for cmbagent-db.

Backends
    ``CMBAGENT_DB_TEST_BACKENDS`` (comma list, default ``sqlite,postgresql``) chooses the
    backends the ``backend`` fixture (and everything built on it) runs against.

PostgreSQL
    Unless ``CMBAGENT_DB_TEST_PG_URL`` names an existing server (its user must be allowed to
    CREATE DATABASE), the run starts its own throwaway PostgreSQL server: initdb into a
    temporary directory, listen on a free port of 127.0.0.1 with scram-sha-256 password auth
    (role ``cmbagent`` / ``s3cret-pw``, superuser), unix socket in the temporary directory,
    fsync off. It is stopped and deleted at the end of the session, also after a failure or
    Ctrl-C / SIGTERM. As root, initdb and pg_ctl run as the ``postgres`` OS user
    (``CMBAGENT_DB_TEST_PG_OS_USER`` to choose another). The recipe is tests/pg_throwaway.py,
    shared with the benchmarks' durable server (bench/pg_server.py).
    Binaries: ``CMBAGENT_DB_TEST_PG_BINDIR``, else ``pg_config --bindir``, else
    ``/usr/lib/postgresql/<version>/bin`` (15 preferred), else ``initdb`` on PATH.

    When PostgreSQL is among the backends and some selected test needs it, the server is
    started (or reached) right after collection; if that fails the whole run stops with an
    error and exit status 1. PostgreSQL tests are never skipped silently: only excluding
    ``postgresql`` from ``CMBAGENT_DB_TEST_BACKENDS`` removes them.

Fixtures
    backend        "sqlite" / "postgresql" (parametrized; test ids end in [sqlite] / [postgresql])
    db_url         fresh, empty, un-migrated database URL of that backend
    migrated_url   db_url after cmbagent_db.init_database(db_url)
    sqlite_url     fresh SQLite database URL (not parametrized)
    pg_url         fresh PostgreSQL database URL (not parametrized; skipped only when
                   postgresql is excluded via CMBAGENT_DB_TEST_BACKENDS)
    new_db_url     factory: new_db_url(backend) -> another fresh database URL (dropped at
                   test end), for tests that need several databases
    pg_server      session-wide server handle (admin_url, url_for(dbname), create_database(),
                   drop_database(name))

    Every test runs with CMBAGENT_DEFAULT_WORK_DIR and HOME pointing at temporary directories
    and CMBAGENT_DATABASE_URL unset, so nothing touches ~/Desktop/cmbdir.

    The functions of tests/test_stage_2.py (the seed's script: no arguments, they call
    get_db_session() without a URL) run once per backend, with CMBAGENT_DATABASE_URL set to a
    fresh migrated database of that backend.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pg_throwaway  # noqa: E402
from pg_throwaway import PgServerError  # noqa: E402

# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------

KNOWN_BACKENDS = ("sqlite", "postgresql")
_BACKEND_ALIASES = {"pg": "postgresql", "postgres": "postgresql", "sqlite3": "sqlite"}

PG_ROLE = "cmbagent"
PG_PASSWORD = "s3cret-pw"

ENV_BACKENDS = "CMBAGENT_DB_TEST_BACKENDS"
ENV_PG_URL = "CMBAGENT_DB_TEST_PG_URL"
ENV_PG_BINDIR = "CMBAGENT_DB_TEST_PG_BINDIR"
ENV_PG_OS_USER = "CMBAGENT_DB_TEST_PG_OS_USER"

STAGE2_MODULE = "test_stage_2"
_TEST_ENV_FIXTURE = "_cmbagent_test_env"


def _parse_backends() -> "tuple[List[str], Optional[str]]":
    raw = os.environ.get(ENV_BACKENDS, "")
    if not raw.strip():
        return list(KNOWN_BACKENDS), None
    out: List[str] = []
    for part in raw.split(","):
        name = part.strip().lower()
        if not name:
            continue
        name = _BACKEND_ALIASES.get(name, name)
        if name not in KNOWN_BACKENDS:
            return [], (
                f"{ENV_BACKENDS}={raw!r}: unknown backend {part.strip()!r} "
                f"(known: {', '.join(KNOWN_BACKENDS)})"
            )
        if name not in out:
            out.append(name)
    if not out:
        return [], f"{ENV_BACKENDS}={raw!r} names no backend"
    return out, None


BACKENDS, _BACKENDS_ERROR = _parse_backends()


def pytest_configure(config: pytest.Config) -> None:
    if _BACKENDS_ERROR:
        raise pytest.UsageError(_BACKENDS_ERROR)
    config.addinivalue_line(
        "markers", "postgresql: test needs the PostgreSQL server (set by conftest)"
    )
    pg_throwaway.install_signal_handlers()


def pytest_report_header(config: pytest.Config) -> List[str]:
    pg = "not requested"
    if "postgresql" in BACKENDS:
        pg = (
            f"external server from {ENV_PG_URL}"
            if os.environ.get(ENV_PG_URL)
            else "throwaway server started by the test run"
        )
    return [f"cmbagent-db backends: {', '.join(BACKENDS)} (PostgreSQL: {pg})"]


# --------------------------------------------------------------------------------------
# PostgreSQL server handling
# --------------------------------------------------------------------------------------


class PgServer(pg_throwaway.PgServer):
    """A PostgreSQL server the tests may create databases on."""

    recipe = pg_throwaway.Recipe(
        role=PG_ROLE,
        password=PG_PASSWORD,
        url_env=ENV_PG_URL,
        bindir_env=ENV_PG_BINDIR,
        os_user_env=ENV_PG_OS_USER,
        os_users=("postgres", "nobody"),
        settings={
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "log_line_prefix": "'%m [%p] %d '",
        },
        initdb_sync=False,
        conf_comment="cmbagent-db test server",
        tmp_prefix="cmbagent-db-pg-",
        tmp_bases=(tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"),
        preferred_major=15,
        local_description="the throwaway PostgreSQL {major} server on port {port}",
        external_description="the server of {env}",
        db_prefix="cmbagent_test",
        purpose="the PostgreSQL tests",
        missing_binaries_hint=(
            "Install them (Debian: apt-get install postgresql), set "
            f"{ENV_PG_BINDIR}, point {ENV_PG_URL} at a server, or exclude it with "
            f"{ENV_BACKENDS}=sqlite"
        ),
    )


_SERVER: Optional[PgServer] = None
_SERVER_ERROR: Optional[str] = None


def get_pg_server() -> PgServer:
    """The session's PostgreSQL server, started on first use. Raises PgServerError."""
    global _SERVER, _SERVER_ERROR
    if _SERVER is not None:
        return _SERVER
    if _SERVER_ERROR is not None:
        raise PgServerError(_SERVER_ERROR)
    try:
        url = os.environ.get(ENV_PG_URL)
        if url:
            server = PgServer.external(url)
            server.check()
        else:
            server = PgServer.start()
    except Exception as exc:
        _SERVER_ERROR = f"PostgreSQL tests requested but no server is available: {exc}"
        raise PgServerError(_SERVER_ERROR) from exc
    _SERVER = server
    return server


def _item_needs_pg(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    if "pg_url" in names or "pg_server" in names:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        for key in ("backend", _TEST_ENV_FIXTURE):
            if callspec.params.get(key) == "postgresql":
                return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        if _item_needs_pg(item):
            item.add_marker(pytest.mark.postgresql)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start (or reach) PostgreSQL before any test runs; stop the run loudly if impossible."""
    if session.config.option.collectonly or "postgresql" not in BACKENDS:
        return
    if not any(_item_needs_pg(item) for item in session.items):
        return
    try:
        server = get_pg_server()
    except PgServerError as exc:
        pytest.exit(str(exc), returncode=1)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and tr.verbosity >= 0:
        tr.write_line(f"cmbagent-db tests: using {server.description}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    pg_throwaway.cleanup_all()


def pytest_unconfigure(config: pytest.Config) -> None:
    pg_throwaway.cleanup_all()
    pg_throwaway.restore_signal_handlers()

# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> PgServer:
    """The session's PostgreSQL server (skipped only if postgresql was excluded)."""
    if "postgresql" not in BACKENDS:
        pytest.skip(f"postgresql excluded by {ENV_BACKENDS}={os.environ.get(ENV_BACKENDS)!r}")
    try:
        return get_pg_server()
    except PgServerError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def restartable_pg_server() -> Iterator[PgServer]:
    """A throwaway PostgreSQL server of the module's own, which its tests may stop and start
    (``restart()``) without touching the session's server. Needs the server binaries even
    when ``CMBAGENT_DB_TEST_PG_URL`` names the session's server."""
    if "postgresql" not in BACKENDS:
        pytest.skip(f"postgresql excluded by {ENV_BACKENDS}={os.environ.get(ENV_BACKENDS)!r}")
    try:
        server = PgServer.start()
    except PgServerError as exc:
        if os.environ.get(ENV_PG_URL):
            pytest.skip(f"restarting a server needs one this run starts: {exc}")
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pgbouncer(pg_server: PgServer) -> pg_throwaway.PgBouncer:
    """PgBouncer in transaction mode in front of the session's PostgreSQL server, pooling
    4 server connections per database (tests/pg_throwaway.py)."""
    try:
        return pg_throwaway.PgBouncer(pg_server).start()
    except PgServerError as exc:
        pytest.fail(str(exc), pytrace=False)


def _sqlite_url_in(directory: Path) -> str:
    return f"sqlite:///{directory / 'test.db'}"


@pytest.fixture
def new_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., str]]:
    """Factory: ``new_db_url("sqlite" | "postgresql")`` -> URL of another fresh, empty database.

    SQLite files live in their own temporary directory; PostgreSQL databases are dropped
    (WITH (FORCE)) when the test ends.
    """
    created: List[str] = []
    server_box: List[PgServer] = []

    def make(backend: str) -> str:
        backend = _BACKEND_ALIASES.get(backend, backend)
        if backend == "sqlite":
            return _sqlite_url_in(tmp_path_factory.mktemp("sqlite"))
        if backend == "postgresql":
            if not server_box:
                server_box.append(request.getfixturevalue("pg_server"))
            url = server_box[0].create_database()
            created.append(url)
            return url
        raise ValueError(f"unknown backend {backend!r}")

    yield make
    errors = []
    for url in created:
        try:
            server_box[0].drop_database(url)
        except Exception as exc:
            errors.append(f"{url}: {exc}")
    if errors:
        raise PgServerError("dropping test databases failed: " + "; ".join(errors))


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend under test: "sqlite" or "postgresql"."""
    return request.param


@pytest.fixture
def db_url(backend: str, tmp_path: Path, new_db_url: Callable[..., str]) -> str:
    """A fresh, empty, un-migrated database of ``backend``.

    SQLite: ``sqlite:////<tmp_path>/test.db`` (the file does not exist yet).
    PostgreSQL: a new database on the test server, dropped after the test.
    """
    if backend == "sqlite":
        return _sqlite_url_in(tmp_path)
    return new_db_url(backend)


@pytest.fixture
def migrated_url(db_url: str) -> str:
    """``db_url`` brought to head with ``cmbagent_db.init_database``."""
    import cmbagent_db

    cmbagent_db.init_database(db_url)
    return db_url


@pytest.fixture
def db(migrated_url: str) -> Iterator[Any]:
    """A ``get_db_session`` session of ``migrated_url``, closed after the test."""
    from cmbagent_db import get_db_session

    session = get_db_session(migrated_url)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def parents(db: Any) -> Tuple[str, str]:
    """(session_id, run_id) of a committed session and workflow run in ``db``."""
    from cmbagent_db.models import Session, WorkflowRun

    s = Session(name="approvals-test")
    db.add(s)
    db.commit()
    r = WorkflowRun(session_id=s.id)
    db.add(r)
    db.commit()
    return s.id, r.id


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database URL (not parametrized)."""
    if "sqlite" not in BACKENDS:
        pytest.skip(f"sqlite excluded by {ENV_BACKENDS}={os.environ.get(ENV_BACKENDS)!r}")
    return _sqlite_url_in(tmp_path)


@pytest.fixture
def pg_url(new_db_url: Callable[..., str]) -> str:
    """A fresh PostgreSQL database URL (not parametrized)."""
    if "postgresql" not in BACKENDS:
        pytest.skip(f"postgresql excluded by {ENV_BACKENDS}={os.environ.get(ENV_BACKENDS)!r}")
    return new_db_url("postgresql")


# --------------------------------------------------------------------------------------
# Environment hygiene and the seed's stage-2 script
# --------------------------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test of tests/test_stage_2.py once per backend.

    Its functions take no arguments, so the autouse fixture below (which every test has in
    its closure) is parametrized indirectly; it then points CMBAGENT_DATABASE_URL at a fresh
    migrated database of that backend.
    """
    module = getattr(metafunc, "module", None)
    if module is None or module.__name__.rsplit(".", 1)[-1] != STAGE2_MODULE:
        return
    if _TEST_ENV_FIXTURE in metafunc.fixturenames:
        metafunc.parametrize(_TEST_ENV_FIXTURE, BACKENDS, ids=BACKENDS, indirect=True)


@pytest.fixture(autouse=True)
def _cmbagent_test_env(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every test: work dir and HOME in temporary directories, CMBAGENT_DATABASE_URL unset.

    For tests of test_stage_2.py (parametrized with a backend name): CMBAGENT_DATABASE_URL
    is a fresh database of that backend, already migrated to head.
    """
    monkeypatch.setenv("CMBAGENT_DEFAULT_WORK_DIR", str(tmp_path_factory.mktemp("cmbdir")))
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("CMBAGENT_DATABASE_URL", raising=False)
    backend_name = getattr(request, "param", None)
    if backend_name is None:
        return
    make = request.getfixturevalue("new_db_url")
    url = make(backend_name)
    import cmbagent_db

    cmbagent_db.init_database(url)
    monkeypatch.setenv("CMBAGENT_DATABASE_URL", url)

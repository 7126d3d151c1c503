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
    Ctrl-C / SIGTERM. As root, initdb and pg_ctl run as the ``postgres`` OS user.
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

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from helpers import pg_dsn  # noqa: E402

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
    _install_signal_handlers()


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


class PgServerError(RuntimeError):
    pass


def _require_psycopg2():
    try:
        import psycopg2  # noqa: F401
    except ImportError as exc:  # pragma: no cover - environment problem
        raise PgServerError(
            "psycopg2 is needed for the PostgreSQL tests: pip install psycopg2-binary "
            "(or run scripts/test.sh)"
        ) from exc
    return psycopg2


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PgServer:
    """A PostgreSQL server the tests may create databases on."""

    def __init__(self, admin_url: str, description: str) -> None:
        self.admin_url = admin_url
        self.description = description
        self._created: List[str] = []

    # -- URLs -------------------------------------------------------------------------
    def url_for(self, dbname: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))

    # -- admin connection ---------------------------------------------------------------
    def _admin(self):
        psycopg2 = _require_psycopg2()
        conn = psycopg2.connect(pg_dsn(self.admin_url), connect_timeout=10)
        conn.autocommit = True
        return conn

    def check(self) -> str:
        conn = self._admin()
        try:
            cur = conn.cursor()
            cur.execute("SELECT version()")
            version = cur.fetchone()[0]
            cur.execute(
                "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user"
            )
            row = cur.fetchone()
            if not row or not row[0]:
                raise PgServerError(
                    f"the user of {self.description} may not CREATE DATABASE "
                    "(needs SUPERUSER or CREATEDB)"
                )
            return version
        finally:
            conn.close()

    def create_database(self, prefix: str = "cmbagent_test") -> str:
        """CREATE DATABASE with a unique name; returns its URL."""
        name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        conn = self._admin()
        try:
            conn.cursor().execute(f"CREATE DATABASE {_quote_ident(name)}")
        finally:
            conn.close()
        self._created.append(name)
        return self.url_for(name)

    def drop_database(self, name_or_url: str) -> None:
        name = name_or_url
        if "://" in name_or_url:
            name = urlsplit(name_or_url).path.lstrip("/")
            from urllib.parse import unquote

            name = unquote(name)
        conn = self._admin()
        try:
            cur = conn.cursor()
            if conn.server_version >= 130000:
                cur.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
            else:  # pragma: no cover - old external servers
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cur.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)}")
        finally:
            conn.close()
        if name in self._created:
            self._created.remove(name)

    def stop(self) -> None:
        """Nothing to stop for an external server."""


class ExternalPgServer(PgServer):
    def __init__(self, url: str) -> None:
        if not re.match(r"^(postgresql|postgres|postgresql\+psycopg2|postgresql\+psycopg)://", url):
            raise PgServerError(f"{ENV_PG_URL} must be a postgresql:// URL")
        parts = urlsplit("postgresql://" + url.split("://", 1)[1])
        if parts.path in ("", "/"):
            parts = parts._replace(path="/postgres")
        super().__init__(urlunsplit(parts), f"the server of {ENV_PG_URL}")

    def stop(self) -> None:
        # Best effort: drop what this run created and left behind.
        for name in list(self._created):
            try:
                self.drop_database(name)
            except Exception:
                pass


def _pg_major(bindir: str) -> int:
    out = subprocess.run(
        [os.path.join(bindir, "initdb"), "--version"], capture_output=True, text=True
    ).stdout
    m = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(m.group(1)) if m else 0


def find_pg_bindir() -> str:
    """Directory holding initdb and pg_ctl (see the module docstring for the search order)."""

    def ok(d: Optional[str]) -> bool:
        return d is not None and d != "" and all(
            os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")
        )

    env = os.environ.get(ENV_PG_BINDIR)
    if env:
        if ok(env):
            return env
        raise PgServerError(f"{ENV_PG_BINDIR}={env!r} holds no initdb/pg_ctl/postgres")
    candidates: List[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(
                subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, timeout=30
                ).stdout.strip()
            )
        except (OSError, subprocess.SubprocessError):
            pass

    def version_key(d: str) -> "tuple[int, int]":
        v = Path(d).parent.name
        try:
            major = int(v.split(".")[0])
        except ValueError:
            major = -1
        return (1 if major == 15 else 0, major)

    debian = [str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")]
    candidates.extend(sorted(debian, key=version_key, reverse=True))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(initdb))
    for d in candidates:
        if ok(d):
            return d
    raise PgServerError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: `pg_config --bindir`, "
        "/usr/lib/postgresql/*/bin and PATH were searched. Install them (Debian: "
        "apt-get install postgresql), set CMBAGENT_DB_TEST_PG_BINDIR, point "
        f"{ENV_PG_URL} at a server, or exclude it with {ENV_BACKENDS}=sqlite"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPgServer(PgServer):
    """Throwaway server: initdb + pg_ctl in a temporary directory."""

    def __init__(self) -> None:
        self.bindir = find_pg_bindir()
        self.major = _pg_major(self.bindir)
        self.tmpdir: Optional[str] = None
        self.datadir: Optional[str] = None
        self.logfile: Optional[str] = None
        self.port: Optional[int] = None
        self._run_as: Optional[pwd.struct_passwd] = None
        self._lock = threading.Lock()
        self._stopped = False
        if os.geteuid() == 0:
            self._run_as = self._pick_os_user()
        super().__init__("", "the throwaway PostgreSQL server")

    # -- running commands -------------------------------------------------------------
    @staticmethod
    def _pick_os_user() -> pwd.struct_passwd:
        wanted = os.environ.get(ENV_PG_OS_USER)
        names = [wanted] if wanted else ["postgres", "nobody"]
        for name in names:
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
        raise PgServerError(
            "running as root, and PostgreSQL refuses to run as root, but no OS user "
            f"{' / '.join(names)} exists to run it as (set {ENV_PG_OS_USER})"
        )

    def _env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        if self._run_as is not None:
            env["HOME"] = self.tmpdir or "/"
            env["USER"] = env["LOGNAME"] = self._run_as.pw_name
        return env

    def _run(self, args: List[str], timeout: float = 120) -> "subprocess.CompletedProcess[Any]":
        """Run a server binary (as the postgres user when we are root).

        Output goes to a file, not a pipe (the postmaster started by pg_ctl must not hold
        our pipe open); it is returned as ``.stdout`` (str).
        """
        assert self.tmpdir is not None
        out_path = os.path.join(self.tmpdir, "cmd.out")
        run_as = self._run_as
        with open(out_path, "w") as out:
            proc: "subprocess.CompletedProcess[Any]" = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                env=self._env(),
                timeout=timeout,
                user=run_as.pw_uid if run_as is not None else None,
                group=run_as.pw_gid if run_as is not None else None,
                extra_groups=[] if run_as is not None else None,
            )
        with open(out_path, errors="replace") as f:
            proc.stdout = f.read()
        return proc

    def _log_tail(self, n: int = 40) -> str:
        if not self.logfile or not os.path.exists(self.logfile):
            return "(no server log)"
        with open(self.logfile, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    # -- temp dir -----------------------------------------------------------------------
    def _make_tmpdir(self) -> str:
        bases = [tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"]
        errors = []
        for base in dict.fromkeys(bases):
            if not os.path.isdir(base):
                continue
            # Unix socket paths are limited to ~107 bytes.
            if len(base) > 60:
                errors.append(f"{base}: path too long for a unix socket")
                continue
            d = tempfile.mkdtemp(prefix="cmbagent-db-pg-", dir=base)
            if self._run_as is None:
                return d
            os.chown(d, self._run_as.pw_uid, self._run_as.pw_gid)
            os.chmod(d, 0o700)
            probe = subprocess.run(
                ["/bin/sh", "-c", 'cd "$1" && touch "$1/.probe" && rm "$1/.probe"', "sh", d],
                user=self._run_as.pw_uid,
                group=self._run_as.pw_gid,
                extra_groups=[],
                capture_output=True,
                text=True,
                cwd="/",
            )
            if probe.returncode == 0:
                return d
            errors.append(f"{base}: not usable by {self._run_as.pw_name}: {probe.stderr.strip()}")
            shutil.rmtree(d, ignore_errors=True)
        raise PgServerError("no temporary directory usable for PostgreSQL: " + "; ".join(errors))

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.tmpdir = self._make_tmpdir()
        _register_cleanup(self)
        self.datadir = os.path.join(self.tmpdir, "data")
        self.logfile = os.path.join(self.tmpdir, "server.log")
        pwfile = os.path.join(self.tmpdir, "pwfile")
        with open(pwfile, "w") as f:
            f.write(PG_PASSWORD + "\n")
        os.chmod(pwfile, 0o600)
        if self._run_as is not None:
            os.chown(pwfile, self._run_as.pw_uid, self._run_as.pw_gid)
            # pg_ctl -l creates the log file as the server user
        host_auth = "scram-sha-256" if self.major >= 14 or self.major == 0 else "md5"
        initdb = self._run(
            [
                os.path.join(self.bindir, "initdb"),
                "-D", self.datadir,
                "-U", PG_ROLE,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                f"--auth-host={host_auth}",
                "-E", "UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )
        os.unlink(pwfile)
        if initdb.returncode != 0:
            raise PgServerError(f"initdb failed (exit {initdb.returncode}):\n{initdb.stdout}")

        conf = os.path.join(self.datadir, "postgresql.conf")
        with open(conf, "a") as f:
            f.write(
                "\n# cmbagent-db test server\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.tmpdir}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 300\n"
                "password_encryption = 'scram-sha-256'\n"
                "log_min_messages = warning\n"
                "log_line_prefix = '%m [%p] %d '\n"
            )

        last = ""
        for _attempt in range(5):
            self.port = _free_port()
            with open(conf, "a") as f:
                f.write(f"port = {self.port}\n")
            proc = self._run(
                [
                    os.path.join(self.bindir, "pg_ctl"),
                    "-D", self.datadir,
                    "-l", self.logfile,
                    "-w", "-t", "60",
                    "start",
                ],
                timeout=90,
            )
            if proc.returncode == 0:
                break
            last = f"pg_ctl start failed (exit {proc.returncode}):\n{proc.stdout}\n{self._log_tail()}"
            self._pg_ctl_stop()  # in case it came up late
            if "could not bind" not in last and "already in use" not in last:
                raise PgServerError(last)
        else:
            raise PgServerError(last)

        self.admin_url = (
            f"postgresql://{PG_ROLE}:{quote(PG_PASSWORD, safe='')}@127.0.0.1:{self.port}/postgres"
        )
        self.description = f"the throwaway PostgreSQL {self.major} server on port {self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                self.check()
                break
            except PgServerError:
                raise
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise PgServerError(
                        f"server started but a password login over TCP fails: {exc}\n"
                        f"{self._log_tail()}"
                    ) from exc
                time.sleep(0.2)

    def _pg_ctl_stop(self) -> None:
        if not self.datadir or not os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            return
        pg_ctl = os.path.join(self.bindir, "pg_ctl")
        for mode in ("fast", "immediate"):
            try:
                proc = self._run([pg_ctl, "-D", self.datadir, "-m", mode, "-w", "-t", "30", "stop"], timeout=45)
                if proc.returncode == 0:
                    return
            except Exception:
                pass
        # Last resort: kill the postmaster named in postmaster.pid.
        try:
            with open(os.path.join(self.datadir, "postmaster.pid")) as f:
                pid = int(f.readline().strip())
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        except Exception:
            pass

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                self._pg_ctl_stop()
            finally:
                if self.tmpdir:
                    shutil.rmtree(self.tmpdir, ignore_errors=True)


_SERVER: Optional[PgServer] = None
_SERVER_ERROR: Optional[str] = None
_CLEANUPS: List[PgServer] = []


def _register_cleanup(server: PgServer) -> None:
    if not _CLEANUPS:
        atexit.register(_cleanup_all)
    _CLEANUPS.append(server)


def _cleanup_all() -> None:
    while _CLEANUPS:
        server = _CLEANUPS.pop()
        try:
            server.stop()
        except Exception as exc:  # pragma: no cover
            sys.stderr.write(f"cmbagent-db tests: stopping PostgreSQL failed: {exc}\n")


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
            server: PgServer = ExternalPgServer(url)
            _register_cleanup(server)
            server.check()
        else:
            server = LocalPgServer()
            try:
                server.start()
            except BaseException:
                server.stop()
                raise
    except Exception as exc:
        _SERVER_ERROR = f"PostgreSQL tests requested but no server is available: {exc}"
        raise PgServerError(_SERVER_ERROR) from exc
    _SERVER = server
    return server


_PREV_HANDLERS: Dict[int, object] = {}


def _install_signal_handlers() -> None:
    """Turn SIGTERM / SIGHUP into KeyboardInterrupt so pytest unwinds and the server stops."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                _PREV_HANDLERS[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # pragma: no cover
            pass


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
    _cleanup_all()


def pytest_unconfigure(config: pytest.Config) -> None:
    _cleanup_all()
    for sig, prev in _PREV_HANDLERS.items():
        try:
            signal.signal(sig, prev)  # type: ignore[arg-type]
        except (ValueError, OSError, TypeError):  # pragma: no cover
            pass
    _PREV_HANDLERS.clear()


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

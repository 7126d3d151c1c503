"""A throwaway PostgreSQL server in a temporary directory, for the tests and the benchmarks.

``initdb`` into a new temporary directory, then ``pg_ctl start`` listening on a free port of
127.0.0.1 with scram-sha-256 password auth for one superuser role and its unix socket in
that directory. The server is stopped and its directory deleted by ``stop()``, at exit, and
on SIGTERM / SIGHUP (turned into KeyboardInterrupt, so the process unwinds and cleans up).
PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as an unprivileged OS user
(``postgres``). Databases are created and dropped through psycopg2.

What differs between the users of the recipe (the role, the environment variables, the
``postgresql.conf`` settings, where the temporary directory may live, ...) is a
:class:`Recipe`; each user subclasses :class:`PgServer` and names its recipe::

    class Server(PgServer):
        recipe = Recipe(role="me", password="pw", ...)

    server = Server.start()          # or Server.external(url) for an existing server
    url = server.create_database()   # postgresql://me:pw@127.0.0.1:PORT/<prefix>_<pid>_<hex>
    server.drop_database(url)
    server.stop()

Users: tests/conftest.py (a fast server, fsync off) and bench/pg_server.py (a durable one).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from helpers import pg_dsn  # noqa: E402

__all__ = [
    "PgServerError",
    "Recipe",
    "PgServer",
    "Cluster",
    "find_bindir",
    "pg_major",
    "free_port",
    "quote_ident",
    "require_psycopg2",
    "register_cleanup",
    "cleanup_all",
    "install_signal_handlers",
    "restore_signal_handlers",
]

_URL_SCHEME = re.compile(r"^(postgresql|postgres|postgresql\+psycopg2|postgresql\+psycopg)://")


class PgServerError(RuntimeError):
    """No usable PostgreSQL server: missing binaries, a failed start, a refused login."""


@dataclass(frozen=True)
class Recipe:
    """How one user of this module wants its server.

    role, password          the superuser initdb creates (password auth over TCP)
    url_env                 environment variable that names an existing server instead
                            (read by the caller; used here in messages and descriptions)
    bindir_env              environment variable naming the directory of initdb / pg_ctl
    os_user_env, os_users   as root: the OS user to run the server as, from ``os_user_env``
                            or else the first of ``os_users`` that exists
    settings, conf_comment  ``postgresql.conf`` lines (values verbatim, so strings carry
                            their quotes) under the comment ``# <conf_comment>``, before the
                            lines every server gets: listen_addresses, unix_socket_directories,
                            password_encryption, log_min_messages, port
    initdb_sync             False: ``initdb --no-sync``
    tls                     True: ``ssl = on`` with a certificate authority and certificates
                            made for the server (``Cluster.tls_files``: see ``make_tls_files``)
    tmp_prefix, tmp_bases   the temporary directory: its name's prefix, and the directories
                            it may be made in, first usable wins
    preferred_major         the /usr/lib/postgresql/<major>/bin to prefer to the newest
    local_description       description of a started server, formatted with major, port
    external_description    description of an existing server, formatted with env (url_env)
    db_prefix               default name prefix of ``create_database``
    purpose                 what psycopg2 is missing for, in the error message
    missing_binaries_hint   the end of the error message when no binaries are found
    """

    role: str
    password: str
    url_env: str
    bindir_env: str
    os_user_env: str
    settings: Mapping[str, str]
    conf_comment: str
    tmp_prefix: str
    tmp_bases: Tuple[str, ...]
    local_description: str
    external_description: str
    db_prefix: str
    purpose: str
    missing_binaries_hint: str
    os_users: Tuple[str, ...] = ("postgres",)
    initdb_sync: bool = True
    tls: bool = False
    preferred_major: Optional[int] = None


def require_psycopg2(purpose: str) -> Any:
    try:
        import psycopg2
    except ImportError as exc:  # pragma: no cover - environment problem
        raise PgServerError(
            f"psycopg2 is needed for {purpose}: pip install psycopg2-binary "
            "(or run scripts/test.sh)"
        ) from exc
    return psycopg2


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def make_tls_files(d: Path, owner: Optional[pwd.struct_passwd] = None) -> Dict[str, Path]:
    """Certificates made with the ``openssl`` command in ``d``: a CA (``ca.crt``), a server
    certificate it signed for the name ``localhost`` only (``server.crt`` / ``.key``, owned by
    ``owner``, the server's OS user), a client certificate for the role ``certuser``
    (``client.crt`` / ``.key``), and another CA that signed nothing (``other-ca.crt``). Keys
    are mode 0600."""
    if shutil.which("openssl") is None:
        raise PgServerError("a TLS server needs the openssl command (apt-get install openssl)")
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", f"/CN=throwaway {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
    for name, subject, ext in (
        ("server", "/CN=localhost", "subjectAltName=DNS:localhost"),
        ("client", "/CN=certuser", "extendedKeyUsage=clientAuth"),
    ):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    files = {n: d / n for n in ("ca.crt", "other-ca.crt", "server.crt", "server.key",
                                "client.crt", "client.key")}
    for f in d.iterdir():
        f.chmod(0o600 if f.suffix == ".key" else 0o644)
    if owner is not None:
        for f in ("server.crt", "server.key", "ca.crt"):
            os.chown(files[f], owner.pw_uid, owner.pw_gid)
    return files


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_major(bindir: str) -> int:
    """The major version of the server binaries in ``bindir`` (0 if unknown)."""
    out = subprocess.run(
        [os.path.join(bindir, "initdb"), "--version"], capture_output=True, text=True
    ).stdout
    m = re.search(r"(\d+)", out)
    return int(m.group(1)) if m else 0


def _has_server_binaries(d: Optional[str]) -> bool:
    if not d:
        return False
    return all(
        os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")
    )


def find_bindir(recipe: Recipe) -> str:
    """Directory holding initdb, pg_ctl and postgres.

    ``$<recipe.bindir_env>`` if set, else ``pg_config --bindir``, else
    ``/usr/lib/postgresql/<version>/bin`` (``recipe.preferred_major`` first, then the newest),
    else the directory of ``initdb`` on PATH.
    """
    env = os.environ.get(recipe.bindir_env)
    if env:
        if _has_server_binaries(env):
            return env
        raise PgServerError(f"{recipe.bindir_env}={env!r} holds no initdb/pg_ctl/postgres")
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

    def version_key(d: str) -> Tuple[int, int]:
        try:
            major = int(Path(d).parent.name.split(".")[0])
        except ValueError:
            major = -1
        return (1 if major == recipe.preferred_major else 0, major)

    debian = [str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")]
    candidates.extend(sorted(debian, key=version_key, reverse=True))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(initdb))
    for d in candidates:
        if _has_server_binaries(d):
            return d
    raise PgServerError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: `pg_config --bindir`, "
        "/usr/lib/postgresql/*/bin and PATH were searched. " + recipe.missing_binaries_hint
    )


# --------------------------------------------------------------------------------------
# Clean-up at exit and on signals
# --------------------------------------------------------------------------------------

_CLEANUPS: List[Any] = []
_PREV_HANDLERS: Dict[int, Any] = {}


def register_cleanup(obj: Any) -> None:
    """Have ``obj.stop()`` called by :func:`cleanup_all`, which runs at exit."""
    if not _CLEANUPS:
        atexit.register(cleanup_all)
    _CLEANUPS.append(obj)


def cleanup_all() -> None:
    """Stop every registered server, newest first; failures go to stderr."""
    while _CLEANUPS:
        obj = _CLEANUPS.pop()
        try:
            obj.stop()
        except Exception as exc:  # pragma: no cover
            sys.stderr.write(f"cmbagent-db: stopping PostgreSQL failed: {exc}\n")


def install_signal_handlers() -> None:
    """Turn SIGTERM / SIGHUP into KeyboardInterrupt, so the process unwinds and cleans up.

    Only signals still at their default disposition are taken over, and only from the main
    thread; calling it again changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                _PREV_HANDLERS[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # pragma: no cover
            pass


def restore_signal_handlers() -> None:
    """Undo :func:`install_signal_handlers`."""
    for sig, prev in _PREV_HANDLERS.items():
        try:
            signal.signal(sig, prev)
        except (ValueError, OSError, TypeError):  # pragma: no cover
            pass
    _PREV_HANDLERS.clear()


# --------------------------------------------------------------------------------------
# The local server: initdb + pg_ctl in a temporary directory
# --------------------------------------------------------------------------------------


def pick_os_user(recipe: Recipe) -> pwd.struct_passwd:
    """As root: the OS user to run a server as (PostgreSQL and PgBouncer refuse root)."""
    env = recipe.os_user_env
    wanted = os.environ.get(env)
    names = [wanted] if wanted else list(recipe.os_users)
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PgServerError(
        "running as root, and PostgreSQL refuses to run as root, but no OS user "
        f"{' / '.join(names)} exists to run it as (set {env})"
    )


def make_tmpdir(recipe: Recipe, run_as: Optional[pwd.struct_passwd]) -> str:
    """A new temporary directory that ``run_as`` (None: this user) may use."""
    errors = []
    for base in dict.fromkeys(recipe.tmp_bases):
        if not os.path.isdir(base):
            continue
        # Unix socket paths are limited to ~107 bytes.
        if len(base) > 60:
            errors.append(f"{base}: path too long for a unix socket")
            continue
        d = tempfile.mkdtemp(prefix=recipe.tmp_prefix, dir=base)
        if run_as is None:
            return d
        os.chown(d, run_as.pw_uid, run_as.pw_gid)
        os.chmod(d, 0o700)
        probe = subprocess.run(
            ["/bin/sh", "-c", 'cd "$1" && touch "$1/.probe" && rm "$1/.probe"', "sh", d],
            user=run_as.pw_uid,
            group=run_as.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            cwd="/",
        )
        if probe.returncode == 0:
            return d
        errors.append(f"{base}: not usable by {run_as.pw_name}: {probe.stderr.strip()}")
        shutil.rmtree(d, ignore_errors=True)
    raise PgServerError("no temporary directory usable for PostgreSQL: " + "; ".join(errors))


class Cluster:
    """A PostgreSQL data directory and its postmaster, in a temporary directory."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.bindir = find_bindir(recipe)
        self.major = pg_major(self.bindir)
        self.run_as: Optional[pwd.struct_passwd] = (
            pick_os_user(recipe) if os.geteuid() == 0 else None
        )
        self.tmpdir: Optional[str] = None
        self.datadir: Optional[str] = None
        self.logfile: Optional[str] = None
        self.port: Optional[int] = None
        #: With ``recipe.tls``: the files ``make_tls_files`` made.
        self.tls_files: Dict[str, Path] = {}
        self._lock = threading.Lock()
        self._stopped = False

    # -- running the server binaries ------------------------------------------------------
    def _env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        if self.run_as is not None:
            env["HOME"] = self.tmpdir or "/"
            env["USER"] = env["LOGNAME"] = self.run_as.pw_name
        return env

    def _run(self, args: List[str], timeout: float = 180) -> "subprocess.CompletedProcess[Any]":
        """Run a server binary (as ``run_as`` when we are root).

        Output goes to a file, not a pipe (the postmaster started by pg_ctl must not hold
        our pipe open); it is returned as ``.stdout`` (str).
        """
        assert self.tmpdir is not None
        out_path = os.path.join(self.tmpdir, "cmd.out")
        run_as = self.run_as
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

    def log_tail(self, n: int = 40) -> str:
        if not self.logfile or not os.path.exists(self.logfile):
            return "(no server log)"
        with open(self.logfile, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> int:
        """initdb and start the server; returns its port."""
        recipe = self.recipe
        self.tmpdir = make_tmpdir(self.recipe, self.run_as)
        self.datadir = os.path.join(self.tmpdir, "data")
        self.logfile = os.path.join(self.tmpdir, "server.log")
        pwfile = os.path.join(self.tmpdir, "pwfile")
        with open(pwfile, "w") as f:
            f.write(recipe.password + "\n")
        os.chmod(pwfile, 0o600)
        if self.run_as is not None:
            os.chown(pwfile, self.run_as.pw_uid, self.run_as.pw_gid)
        host_auth = "scram-sha-256" if self.major >= 14 or self.major == 0 else "md5"
        initdb = self._run(
            [
                os.path.join(self.bindir, "initdb"),
                "-D", self.datadir,
                "-U", recipe.role,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                f"--auth-host={host_auth}",
                "-E", "UTF8",
                "--no-locale",
            ]
            + ([] if recipe.initdb_sync else ["--no-sync"])
        )
        os.unlink(pwfile)
        if initdb.returncode != 0:
            raise PgServerError(f"initdb failed (exit {initdb.returncode}):\n{initdb.stdout}")

        conf = os.path.join(self.datadir, "postgresql.conf")
        with open(conf, "a") as f:
            f.write(f"\n# {recipe.conf_comment}\n")
            for key, value in recipe.settings.items():
                f.write(f"{key} = {value}\n")
            f.write(
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.tmpdir}'\n"
                "password_encryption = 'scram-sha-256'\n"
                "log_min_messages = warning\n"
            )
            if recipe.tls:
                self.tls_files = make_tls_files(Path(self.tmpdir) / "tls", self.run_as)
                f.write(
                    "ssl = on\n"
                    f"ssl_cert_file = '{self.tls_files['server.crt']}'\n"
                    f"ssl_key_file = '{self.tls_files['server.key']}'\n"
                    f"ssl_ca_file = '{self.tls_files['ca.crt']}'\n"
                )

        last = ""
        for _attempt in range(5):
            self.port = free_port()
            with open(conf, "a") as f:
                f.write(f"port = {self.port}\n")
            proc = self._pg_ctl_start()
            if proc.returncode == 0:
                return self.port
            last = f"pg_ctl start failed (exit {proc.returncode}):\n{proc.stdout}\n{self.log_tail()}"
            self._pg_ctl_stop()  # in case it came up late
            if "could not bind" not in last and "already in use" not in last:
                break
        raise PgServerError(last)

    def restart(self, down_for: float = 1.0) -> None:
        """Stop the server (``-m fast``: every client's connection is closed), keep it down
        for ``down_for`` seconds, and start it again on the same port and data."""
        self._pg_ctl_stop()
        time.sleep(down_for)
        proc = self._pg_ctl_start()
        if proc.returncode != 0:
            raise PgServerError(f"pg_ctl start after a stop failed:\n{proc.stdout}\n{self.log_tail()}")

    def _pg_ctl_start(self) -> "subprocess.CompletedProcess[Any]":
        """pg_ctl start of the data directory, waiting until the server accepts connections."""
        assert self.datadir is not None and self.logfile is not None
        return self._run(
            [
                os.path.join(self.bindir, "pg_ctl"),
                "-D", self.datadir,
                "-l", self.logfile,
                "-w", "-t", "60",
                "start",
            ],
            timeout=90,
        )

    def _pg_ctl_stop(self) -> None:
        if not self.datadir or not os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            return
        pg_ctl = os.path.join(self.bindir, "pg_ctl")
        for mode in ("fast", "immediate"):
            try:
                proc = self._run(
                    [pg_ctl, "-D", self.datadir, "-m", mode, "-w", "-t", "30", "stop"], timeout=45
                )
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
        """Stop the server and delete its directory (once; later calls do nothing)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                self._pg_ctl_stop()
            finally:
                if self.tmpdir:
                    shutil.rmtree(self.tmpdir, ignore_errors=True)


# --------------------------------------------------------------------------------------
# The server handle
# --------------------------------------------------------------------------------------

_S = TypeVar("_S", bound="PgServer")


class PgServer:
    """A PostgreSQL server whose user may CREATE DATABASE; subclasses set ``recipe``."""

    recipe: ClassVar[Recipe]

    def __init__(self, admin_url: str, description: str, cluster: Optional[Cluster] = None) -> None:
        self.admin_url = admin_url
        self.description = description
        self.cluster = cluster
        self.created: List[str] = []

    # -- construction -------------------------------------------------------------------
    @classmethod
    def external(cls: "type[_S]", url: str) -> _S:
        """An existing server (``url``, normally from ``$<recipe.url_env>``); its
        ``postgres`` database when the URL names none. At exit (or ``stop()``) the databases
        this process created and did not drop are dropped."""
        env = cls.recipe.url_env
        if not _URL_SCHEME.match(url):
            raise PgServerError(f"{env} must be a postgresql:// URL")
        parts = urlsplit("postgresql://" + url.split("://", 1)[1])
        if parts.path in ("", "/"):
            parts = parts._replace(path="/postgres")
        server = cls(urlunsplit(parts), cls.recipe.external_description.format(env=env))
        register_cleanup(server)
        return server

    @classmethod
    def start(cls: "type[_S]") -> _S:
        """A new throwaway server, ready for password logins over TCP."""
        recipe = cls.recipe
        install_signal_handlers()
        cluster = Cluster(recipe)
        register_cleanup(cluster)
        try:
            port = cluster.start()
            server = cls(
                f"postgresql://{recipe.role}:{quote(recipe.password, safe='')}"
                f"@127.0.0.1:{port}/postgres",
                recipe.local_description.format(major=cluster.major, port=port),
                cluster,
            )
            server.wait_ready()
        except BaseException:
            cluster.stop()
            raise
        return server

    def restart(self, down_for: float = 1.0) -> None:
        """Stop this throwaway server, wait ``down_for`` seconds, start it again."""
        if self.cluster is None:
            raise PgServerError(f"{self.description} is not this process's to restart")
        self.cluster.restart(down_for)
        self.wait_ready()

    # -- URLs ---------------------------------------------------------------------------
    def url_for(self, dbname: str) -> str:
        return urlunsplit(urlsplit(self.admin_url)._replace(path="/" + quote(dbname, safe="")))

    @staticmethod
    def dbname(url: str) -> str:
        return unquote(urlsplit(url).path.lstrip("/"))

    def dsn(self, url: Optional[str] = None) -> str:
        """A libpq URI for psycopg2 (which rejects the +driver schemes)."""
        return pg_dsn(url or self.admin_url)

    # -- admin connection -----------------------------------------------------------------
    def _admin(self) -> Any:
        psycopg2 = require_psycopg2(self.recipe.purpose)
        conn = psycopg2.connect(self.dsn(), connect_timeout=10)
        conn.autocommit = True
        return conn

    def query(self, sql: str, args: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        """Run one statement on the admin database; its rows ([] if it returns none)."""
        conn = self._admin()
        try:
            cur = conn.cursor()
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def check(self) -> str:
        """The server's version; PgServerError if its user may not CREATE DATABASE."""
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

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until :meth:`check` passes (a just-started server may refuse logins)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.check()
                return
            except PgServerError:
                raise
            except Exception as exc:
                if time.monotonic() > deadline:
                    tail = self.cluster.log_tail() if self.cluster is not None else ""
                    raise PgServerError(
                        f"server started but a password login over TCP fails: {exc}\n{tail}"
                    ) from exc
                time.sleep(0.2)

    def create_database(self, prefix: Optional[str] = None, template: Optional[str] = None) -> str:
        """CREATE DATABASE with a unique name (``<prefix>_<pid>_<hex>``); returns its URL.

        With ``template``, a copy of that database, made with STRATEGY = FILE_COPY
        (PostgreSQL 15+): copy the files and checkpoint, instead of pushing a big template
        through the WAL block by block.
        """
        name = f"{prefix or self.recipe.db_prefix}_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        sql = f"CREATE DATABASE {quote_ident(name)}"
        if template:
            sql += f" TEMPLATE {quote_ident(template)} STRATEGY = FILE_COPY"
        conn = self._admin()
        try:
            conn.cursor().execute(sql)
        finally:
            conn.close()
        self.created.append(name)
        return self.url_for(name)

    def drop_database(self, name_or_url: str) -> None:
        """DROP DATABASE IF EXISTS, disconnecting its sessions first."""
        name = self.dbname(name_or_url) if "://" in name_or_url else name_or_url
        conn = self._admin()
        try:
            cur = conn.cursor()
            if conn.server_version >= 130000:
                cur.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
            else:  # pragma: no cover - old external servers
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cur.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)}")
        finally:
            conn.close()
        if name in self.created:
            self.created.remove(name)

    def stop(self) -> None:
        """A throwaway server: stop and delete it. An external one: drop what this process
        created and left behind (best effort)."""
        if self.cluster is not None:
            self.cluster.stop()
            return
        for name in list(self.created):
            try:
                self.drop_database(name)
            except Exception:
                pass


# --------------------------------------------------------------------------------------
# PgBouncer in front of a server
# --------------------------------------------------------------------------------------


class PgBouncer:
    """PgBouncer in transaction mode (``pool_mode = transaction``, the mode deployments of
    several instances run it in) in front of ``server``, listening on a free port of
    127.0.0.1, in a temporary directory. Clients log in as any user without a password
    (``auth_type = any``); PgBouncer logs in to the server as the server URL's user.
    Debian's package is ``pgbouncer``; ``CMBAGENT_DB_TEST_PGBOUNCER`` names another binary."""

    binary_env = "CMBAGENT_DB_TEST_PGBOUNCER"

    def __init__(self, server: "PgServer", pool_size: int = 4) -> None:
        self.server = server
        self.pool_size = pool_size
        self.run_as = pick_os_user(server.recipe) if os.geteuid() == 0 else None
        self.tmpdir: Optional[str] = None
        self.port: Optional[int] = None
        self.proc: Optional["subprocess.Popen[bytes]"] = None

    @classmethod
    def binary(cls) -> str:
        found = os.environ.get(cls.binary_env) or shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
        if not found:
            raise PgServerError(
                "the PgBouncer tests need pgbouncer (Debian: apt-get install pgbouncer, "
                f"or set {cls.binary_env}); scripts/test.sh installs it")
        return found

    def start(self) -> "PgBouncer":
        target = urlsplit(self.server.admin_url)
        self.tmpdir = make_tmpdir(self.server.recipe, self.run_as)
        conf = os.path.join(self.tmpdir, "pgbouncer.ini")
        self.port = free_port()
        server_conn = (f"host={target.hostname} port={target.port or 5432} "
                       f"user={unquote(target.username or '')} "
                       f"password={unquote(target.password or '')}")
        with open(conf, "w") as f:
            f.write(
                "[databases]\n"
                f"* = {server_conn}\n"
                "[pgbouncer]\n"
                "listen_addr = 127.0.0.1\n"
                f"listen_port = {self.port}\n"
                "unix_socket_dir =\n"
                "auth_type = any\n"
                "pool_mode = transaction\n"
                f"default_pool_size = {self.pool_size}\n"
                "max_client_conn = 2000\n"
                "ignore_startup_parameters = extra_float_digits\n"
                f"logfile = {self.tmpdir}/pgbouncer.log\n"
                f"pidfile = {self.tmpdir}/pgbouncer.pid\n"
            )
        os.chmod(conf, 0o600)
        if self.run_as is not None:
            os.chown(conf, self.run_as.pw_uid, self.run_as.pw_gid)
        self._spawn(conf)
        register_cleanup(self)
        return self

    def _spawn(self, conf: str) -> None:
        run_as = self.run_as
        self.proc = subprocess.Popen(
            [self.binary(), conf],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=self.tmpdir,
            user=run_as.pw_uid if run_as is not None else None,
            group=run_as.pw_gid if run_as is not None else None,
            extra_groups=[] if run_as is not None else None,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise PgServerError(f"pgbouncer did not start:\n{self.log_tail()}")

    def restart(self, down_for: float = 1.0) -> None:
        """Stop PgBouncer (every client and server connection is dropped), wait
        ``down_for`` seconds, and start it again on the same port."""
        assert self.proc is not None and self.tmpdir is not None
        self._terminate()
        time.sleep(down_for)
        self._spawn(os.path.join(self.tmpdir, "pgbouncer.ini"))

    def log_tail(self, n: int = 30) -> str:
        path = os.path.join(self.tmpdir or "", "pgbouncer.log")
        if not os.path.exists(path):
            return "(no pgbouncer log)"
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def url_for(self, dbname: str, user: str = "cmbagent") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def _terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self._terminate()
        self.proc = None
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

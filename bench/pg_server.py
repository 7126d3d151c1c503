"""A throwaway PostgreSQL server for the benchmarks, durable like a production one.

Unlike the test server (tests/conftest.py: fsync off), this one keeps PostgreSQL's durable
defaults -- ``fsync = on``, ``synchronous_commit = on``, ``full_page_writes = on`` -- and
says so explicitly in ``postgresql.conf``, so that a commit costs the same disk flush as the
SQLite side's ``synchronous=FULL``. It listens on a free port of 127.0.0.1 with
scram-sha-256 password auth, lives in a temporary directory, and is stopped and deleted at
exit (also on SIGTERM / SIGHUP). As root, initdb and pg_ctl run as the ``postgres`` user.

    server = PgServer.start()           # or PgServer.external(url)
    url = server.create_database()      # postgresql://bench:...@127.0.0.1:PORT/bench_xxx
    server.create_database(template="bench_base")
    server.drop_database(url)
    server.stop()
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
import tempfile
import time
import uuid
from pathlib import Path
from typing import List, Optional
from urllib.parse import quote, unquote, urlsplit, urlunsplit

ROLE = "bench"
PASSWORD = "bench-pw"

# Durability on purpose: these are PostgreSQL's defaults, written out so nobody wonders.
DURABLE_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "wal_sync_method": "fdatasync",
}


class PgServerError(RuntimeError):
    pass


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_bindir() -> str:
    def ok(d: Optional[str]) -> bool:
        return bool(d) and all(
            os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")
        )

    env = os.environ.get("CMBAGENT_DB_BENCH_PG_BINDIR")
    if env:
        if ok(env):
            return env
        raise PgServerError(f"CMBAGENT_DB_BENCH_PG_BINDIR={env!r} holds no initdb/pg_ctl")
    candidates: List[str] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(
        (str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")),
        key=lambda d: int(re.sub(r"\D", "", Path(d).parent.name) or 0),
        reverse=True,
    )
    if shutil.which("initdb"):
        candidates.append(os.path.dirname(shutil.which("initdb")))
    for d in candidates:
        if ok(d):
            return d
    raise PgServerError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install them, set "
        "CMBAGENT_DB_BENCH_PG_BINDIR, or point CMBAGENT_DB_BENCH_PG_URL at a server"
    )


class PgServer:
    def __init__(self, admin_url: str, description: str) -> None:
        self.admin_url = admin_url
        self.description = description
        self.created: List[str] = []
        self._local: Optional[_Local] = None

    # -- construction ---------------------------------------------------------------
    @classmethod
    def external(cls, url: str) -> "PgServer":
        parts = urlsplit("postgresql://" + url.split("://", 1)[1])
        if parts.path in ("", "/"):
            parts = parts._replace(path="/postgres")
        server = cls(urlunsplit(parts), "CMBAGENT_DB_BENCH_PG_URL")
        atexit.register(server.stop)
        return server

    @classmethod
    def start(cls) -> "PgServer":
        local = _Local()
        try:
            port = local.start()
        except BaseException:
            local.stop()
            raise
        server = cls(
            f"postgresql://{ROLE}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/postgres",
            f"throwaway PostgreSQL {local.major} on 127.0.0.1:{port} (fsync on, synchronous_commit on)",
        )
        server._local = local
        atexit.register(server.stop)
        _install_signal_handlers()
        server.wait_ready()
        return server

    # -- admin ------------------------------------------------------------------------
    def url_for(self, dbname: str) -> str:
        return urlunsplit(urlsplit(self.admin_url)._replace(path="/" + quote(dbname, safe="")))

    def dsn(self, url: Optional[str] = None) -> str:
        """A libpq DSN for psycopg2 (which rejects the +driver schemes)."""
        return "postgresql://" + (url or self.admin_url).split("://", 1)[1]

    def _admin(self):
        import psycopg2

        conn = psycopg2.connect(self.dsn(), connect_timeout=10)
        conn.autocommit = True
        return conn

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._admin().close()
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise PgServerError(f"PostgreSQL does not accept logins: {exc}") from exc
                time.sleep(0.2)

    def query(self, sql: str, args=()):
        conn = self._admin()
        try:
            cur = conn.cursor()
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def version(self) -> str:
        return self.query("SHOW server_version")[0][0]

    def settings(self) -> dict:
        names = ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method", "shared_buffers")
        return {n: self.query(f"SHOW {n}")[0][0] for n in names}

    def create_database(self, prefix: str = "bench", template: Optional[str] = None) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        sql = f"CREATE DATABASE {_quote_ident(name)}"
        if template:
            # FILE_COPY: copy the files and checkpoint, instead of pushing a big template
            # through the WAL block by block.
            sql += f" TEMPLATE {_quote_ident(template)} STRATEGY = FILE_COPY"
        conn = self._admin()
        try:
            conn.cursor().execute(sql)
        finally:
            conn.close()
        self.created.append(name)
        return self.url_for(name)

    @staticmethod
    def dbname(url: str) -> str:
        return unquote(urlsplit(url).path.lstrip("/"))

    def drop_database(self, name_or_url: str) -> None:
        name = self.dbname(name_or_url) if "://" in name_or_url else name_or_url
        conn = self._admin()
        try:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
        finally:
            conn.close()
        if name in self.created:
            self.created.remove(name)

    def stop(self) -> None:
        if self._local is not None:
            self._local.stop()
            self._local = None
            return
        for name in list(self.created):
            try:
                self.drop_database(name)
            except Exception:
                pass


class _Local:
    """initdb + pg_ctl in a temporary directory."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        out = subprocess.run(
            [os.path.join(self.bindir, "initdb"), "--version"], capture_output=True, text=True
        ).stdout
        m = re.search(r"(\d+)", out)
        self.major = int(m.group(1)) if m else 0
        self.run_as = pwd.getpwnam(os.environ.get("CMBAGENT_DB_BENCH_PG_OS_USER", "postgres")) if os.geteuid() == 0 else None
        self.tmpdir: Optional[str] = None
        self.datadir: Optional[str] = None
        self.logfile: Optional[str] = None
        self.stopped = False

    def _run(self, args: List[str], timeout: float = 180) -> subprocess.CompletedProcess:
        assert self.tmpdir is not None
        out_path = os.path.join(self.tmpdir, "cmd.out")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if self.run_as is not None:
            env.update(HOME=self.tmpdir, USER=self.run_as.pw_name, LOGNAME=self.run_as.pw_name)
        # Output to a file: the postmaster must not inherit a pipe of ours.
        with open(out_path, "w") as out:
            proc = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                env=env,
                timeout=timeout,
                user=self.run_as.pw_uid if self.run_as else None,
                group=self.run_as.pw_gid if self.run_as else None,
                extra_groups=[] if self.run_as else None,
            )
        with open(out_path, errors="replace") as f:
            proc.stdout = f.read()
        return proc

    def _log_tail(self) -> str:
        try:
            with open(self.logfile or "", errors="replace") as f:
                return "".join(f.readlines()[-30:])
        except OSError:
            return "(no server log)"

    def start(self) -> int:
        # A short base: unix socket paths are limited to ~107 bytes. Not /dev/shm: the
        # data directory must be on the disk the SQLite files are on, to pay the same fsync.
        base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
        self.tmpdir = tempfile.mkdtemp(prefix="cmbagent-db-bench-pg-", dir=base)
        if self.run_as is not None:
            os.chown(self.tmpdir, self.run_as.pw_uid, self.run_as.pw_gid)
            os.chmod(self.tmpdir, 0o700)
        self.datadir = os.path.join(self.tmpdir, "data")
        self.logfile = os.path.join(self.tmpdir, "server.log")
        pwfile = os.path.join(self.tmpdir, "pwfile")
        with open(pwfile, "w") as f:
            f.write(PASSWORD + "\n")
        os.chmod(pwfile, 0o600)
        if self.run_as is not None:
            os.chown(pwfile, self.run_as.pw_uid, self.run_as.pw_gid)
        auth = "scram-sha-256" if self.major >= 14 else "md5"
        proc = self._run(
            [
                os.path.join(self.bindir, "initdb"),
                "-D", self.datadir,
                "-U", ROLE,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                f"--auth-host={auth}",
                "-E", "UTF8",
                "--no-locale",
            ]
        )
        os.unlink(pwfile)
        if proc.returncode != 0:
            raise PgServerError(f"initdb failed:\n{proc.stdout}")
        conf = os.path.join(self.datadir, "postgresql.conf")
        with open(conf, "a") as f:
            f.write("\n# cmbagent-db benchmark server: durable, like production\n")
            for k, v in DURABLE_SETTINGS.items():
                f.write(f"{k} = {v}\n")
            f.write(
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.tmpdir}'\n"
                "max_connections = 100\n"
                "password_encryption = 'scram-sha-256'\n"
                "log_min_messages = warning\n"
            )
        last = ""
        for _ in range(5):
            port = _free_port()
            with open(conf, "a") as f:
                f.write(f"port = {port}\n")
            proc = self._run(
                [os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-l", self.logfile,
                 "-w", "-t", "60", "start"],
                timeout=90,
            )
            if proc.returncode == 0:
                return port
            last = f"pg_ctl start failed:\n{proc.stdout}\n{self._log_tail()}"
            if "could not bind" not in last and "already in use" not in last:
                break
        raise PgServerError(last)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.datadir and os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
                pg_ctl = os.path.join(self.bindir, "pg_ctl")
                for mode in ("fast", "immediate"):
                    try:
                        if self._run([pg_ctl, "-D", self.datadir, "-m", mode, "-w", "-t", "30", "stop"], timeout=45).returncode == 0:
                            break
                    except Exception:
                        pass
        finally:
            if self.tmpdir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)


_HANDLERS_SET = False


def _install_signal_handlers() -> None:
    """SIGTERM / SIGHUP unwind like Ctrl-C, so atexit stops the server."""
    global _HANDLERS_SET
    if _HANDLERS_SET:
        return
    _HANDLERS_SET = True

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, handler)
        except (ValueError, OSError):
            pass


def get_server() -> PgServer:
    """CMBAGENT_DB_BENCH_PG_URL if set, else a throwaway local server."""
    url = os.environ.get("CMBAGENT_DB_BENCH_PG_URL")
    return PgServer.external(url) if url else PgServer.start()


if __name__ == "__main__":
    s = get_server()
    print(s.description, s.version(), s.settings())
    u = s.create_database()
    print("created", u.replace(PASSWORD, "***"))
    s.drop_database(u)
    s.stop()

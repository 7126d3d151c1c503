"""A throwaway PostgreSQL server for the benchmarks, durable like a production one.

Unlike the test server (tests/conftest.py: fsync off), this one keeps PostgreSQL's durable
defaults -- ``fsync = on``, ``synchronous_commit = on``, ``full_page_writes = on`` -- and
says so explicitly in ``postgresql.conf``, so that a commit costs the same disk flush as the
SQLite side's ``synchronous=FULL``. Its data directory is under /tmp (on disk, like the
SQLite files; not /dev/shm). Everything else is the shared recipe of tests/pg_throwaway.py:
a free port of 127.0.0.1, scram-sha-256 password auth, stopped and deleted at exit (also on
SIGTERM / SIGHUP), initdb and pg_ctl run as the ``postgres`` user when we are root.

Environment: ``CMBAGENT_DB_BENCH_PG_URL`` (an existing server whose user may CREATE
DATABASE, instead of a throwaway one), ``CMBAGENT_DB_BENCH_PG_BINDIR`` (where initdb and
pg_ctl live), ``CMBAGENT_DB_BENCH_PG_OS_USER`` (the OS user to run them as when root).

    server = PgServer.start()           # or PgServer.external(url)
    url = server.create_database()      # postgresql://bench:...@127.0.0.1:PORT/bench_<pid>_<hex>
    server.create_database(template="bench_base")
    server.drop_database(url)
    server.stop()
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Dict

_TESTS_DIR = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pg_throwaway  # noqa: E402
from pg_throwaway import PgServerError, Recipe  # noqa: E402,F401

ROLE = "bench"
PASSWORD = "bench-pw"
ENV_URL = "CMBAGENT_DB_BENCH_PG_URL"
ENV_BINDIR = "CMBAGENT_DB_BENCH_PG_BINDIR"
ENV_OS_USER = "CMBAGENT_DB_BENCH_PG_OS_USER"

# Durability on purpose: these are PostgreSQL's defaults, written out so nobody wonders.
DURABLE_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "wal_sync_method": "fdatasync",
}

# What the report shows about the server.
REPORTED_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method", "shared_buffers")


class PgServer(pg_throwaway.PgServer):
    """The benchmarks' PostgreSQL server: role ``bench``, durable settings."""

    recipe = Recipe(
        role=ROLE,
        password=PASSWORD,
        url_env=ENV_URL,
        bindir_env=ENV_BINDIR,
        os_user_env=ENV_OS_USER,
        settings={**DURABLE_SETTINGS, "max_connections": "100"},
        conf_comment="cmbagent-db benchmark server: durable, like production",
        tmp_prefix="cmbagent-db-bench-pg-",
        # A short base: unix socket paths are limited to ~107 bytes. Not /dev/shm: the
        # data directory must be on the disk the SQLite files are on, to pay the same fsync.
        tmp_bases=("/tmp",) if os.path.isdir("/tmp") else (tempfile.gettempdir(),),
        local_description=(
            "throwaway PostgreSQL {major} on 127.0.0.1:{port} (fsync on, synchronous_commit on)"
        ),
        external_description="{env}",
        db_prefix="bench",
        # ssl = on, for the rows over TLS (sslmode=require) beside the plain ones.
        tls=True,
        purpose="the PostgreSQL benchmarks",
        missing_binaries_hint=f"Install them, set {ENV_BINDIR}, or point {ENV_URL} at a server",
    )

    def version(self) -> str:
        return self.query("SHOW server_version")[0][0]

    def settings(self) -> Dict[str, str]:
        return {n: self.query(f"SHOW {n}")[0][0] for n in REPORTED_SETTINGS}


def get_server() -> PgServer:
    """CMBAGENT_DB_BENCH_PG_URL if set, else a throwaway local server."""
    url = os.environ.get(ENV_URL)
    return PgServer.external(url) if url else PgServer.start()


if __name__ == "__main__":
    s = get_server()
    print(s.description, s.version(), s.settings())
    u = s.create_database()
    print("created", u.replace(PASSWORD, "***"))
    s.drop_database(u)
    s.stop()

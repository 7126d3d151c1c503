"""TLS to PostgreSQL and libpq's connection conventions, against real servers: a second
throwaway server started here with ``ssl = on`` and a certificate authority made here (its
server certificate names ``localhost`` only), and the session's server (no TLS).

Roles on the TLS server: the superuser (password, TLS or not), ``tlsonly`` (password, over
TLS only: a component that connects as it proves it used TLS), ``certuser`` (a client
certificate, no password).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from pathlib import Path
from typing import Dict, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

import cmbagent_db
from cmbagent_db import approvals, dbapi
from cmbagent_db.exceptions import OperationalError
from cmbagent_db.models import Session, WorkflowRun

import conftest

TLS_ROLE_PASSWORD = "tls-only-pw"


@dataclasses.dataclass
class TlsServer:
    server: conftest.PgServer
    certs: Dict[str, Path]
    port: int

    def url(self, *, host: str = "127.0.0.1", user: str = conftest.PG_ROLE,
            password: str | None = conftest.PG_PASSWORD, db: str = "postgres",
            **params: str) -> str:
        auth = user if password is None else f"{user}:{quote(password, safe='')}"
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{auth}@{host}:{self.port}/{db}" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
def tls(pg_server) -> Iterator[TlsServer]:
    base = conftest.PgServer.recipe
    recipe = dataclasses.replace(base, tls=True, conf_comment="cmbagent-db TLS test server")
    server = type("TlsPgServer", (conftest.PgServer,), {"recipe": recipe}).start()
    cluster = server.cluster
    assert cluster is not None
    hba = Path(cluster.datadir) / "pg_hba.conf"
    hba.write_text(
        "hostssl all certuser 127.0.0.1/32 cert\n"
        "hostnossl all tlsonly 127.0.0.1/32 reject\n"
        "hostnossl all tlsonly ::1/128 reject\n" + hba.read_text()
    )
    server.query("SELECT pg_reload_conf()")
    server.query("CREATE ROLE certuser LOGIN")
    server.query(f"CREATE ROLE tlsonly LOGIN PASSWORD '{TLS_ROLE_PASSWORD}' CREATEDB")
    yield TlsServer(server, cluster.tls_files, urlsplit(server.admin_url).port or 5432)
    cluster.stop()


@pytest.fixture
def no_libpq_env(monkeypatch, tmp_path):
    """No PG* variables, and a home without ~/.postgresql or ~/.pgpass."""
    for k in list(os.environ):
        if k.startswith("PG"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def ssl_in_use(url: str) -> bool:
    conn = dbapi.connect(url)
    try:
        cur = conn.cursor()
        cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        return bool(cur.fetchone()[0])
    finally:
        conn.close()


# ------------------------------------------------------------------ sslmode


def test_each_tls_mode_connects_over_tls(tls, no_libpq_env):
    ca = tls.certs["ca.crt"]
    assert ssl_in_use(tls.url(sslmode="require"))
    assert ssl_in_use(tls.url(sslmode="verify-ca", sslrootcert=str(ca)))
    assert ssl_in_use(tls.url(host="localhost", sslmode="verify-full", sslrootcert=str(ca)))
    assert ssl_in_use(tls.url(sslmode="prefer"))
    assert ssl_in_use(tls.url())  # prefer is the default
    assert not ssl_in_use(tls.url(sslmode="disable"))


def test_verify_full_refuses_a_certificate_for_another_name(tls, no_libpq_env):
    url = tls.url(host="127.0.0.1", sslmode="verify-full", sslrootcert=str(tls.certs["ca.crt"]))
    with pytest.raises(OperationalError, match=r'not valid for the host name "127\.0\.0\.1"'):
        dbapi.connect(url)


def test_a_certificate_of_another_authority_is_refused(tls, no_libpq_env):
    url = tls.url(sslmode="verify-ca", sslrootcert=str(tls.certs["other-ca.crt"]))
    with pytest.raises(OperationalError, match="not issued by a certificate authority of the root certificates in"):
        dbapi.connect(url)


def test_verifying_without_root_certificates_says_what_to_give(tls, no_libpq_env):
    with pytest.raises(OperationalError, match="sslrootcert=FILE"):
        dbapi.connect(tls.url(sslmode="verify-full"))


def test_the_default_root_file_and_pgsslmode_are_read_as_libpq_reads_them(
        tls, no_libpq_env, monkeypatch):
    dot = no_libpq_env / ".postgresql"
    dot.mkdir()
    shutil.copy(tls.certs["other-ca.crt"], dot / "root.crt")
    monkeypatch.setenv("PGSSLMODE", "verify-ca")
    with pytest.raises(OperationalError, match=str(dot / "root.crt")):
        dbapi.connect(tls.url())
    # A root file makes require check the chain too (libpq's rule)...
    with pytest.raises(OperationalError, match="not issued by"):
        dbapi.connect(tls.url(sslmode="require"))
    # ...and PGSSLROOTCERT names another.
    monkeypatch.setenv("PGSSLROOTCERT", str(tls.certs["ca.crt"]))
    assert ssl_in_use(tls.url())


def test_require_against_a_server_without_tls_fails_clearly(pg_server, no_libpq_env):
    url = pg_server.admin_url + "?sslmode=require"
    with pytest.raises(OperationalError, match="sslmode=require needs TLS"):
        dbapi.connect(url)
    assert not ssl_in_use(pg_server.admin_url + "?sslmode=prefer")


def test_allow_falls_back_to_tls_when_the_server_refuses_without(tls, no_libpq_env):
    kw = dict(user="tlsonly", password=TLS_ROLE_PASSWORD)
    with pytest.raises(OperationalError, match="tlsonly"):
        dbapi.connect(tls.url(sslmode="disable", **kw))
    assert ssl_in_use(tls.url(sslmode="allow", **kw))
    assert not ssl_in_use(tls.url(sslmode="allow"))  # the superuser may connect without


def test_a_client_certificate_logs_in(tls, no_libpq_env):
    cert, key = tls.certs["client.crt"], tls.certs["client.key"]
    url = tls.url(user="certuser", password=None, sslmode="verify-ca",
                  sslrootcert=str(tls.certs["ca.crt"]), sslcert=str(cert), sslkey=str(key))
    conn = dbapi.connect(url)
    cur = conn.cursor()
    cur.execute("SELECT current_user, ssl, client_dn FROM pg_stat_ssl "
                "JOIN pg_stat_activity USING (pid) WHERE pid = pg_backend_pid()")
    assert cur.fetchone() == ("certuser", True, "/CN=certuser")
    conn.close()
    with pytest.raises(OperationalError, match="certuser"):
        dbapi.connect(tls.url(user="certuser", password=None, sslmode="require"))


def test_a_client_key_others_can_read_is_refused(tls, no_libpq_env, tmp_path):
    key = tmp_path / "client.key"
    shutil.copy(tls.certs["client.key"], key)
    key.chmod(0o644)
    url = tls.url(user="certuser", password=None, sslmode="require",
                  sslcert=str(tls.certs["client.crt"]), sslkey=str(key))
    with pytest.raises(OperationalError, match="chmod 0600"):
        dbapi.connect(url)


def test_sessions_the_waiter_and_the_migrator_use_tls(tls, no_libpq_env):
    """As tlsonly, who may not connect without TLS: every component got through."""
    kw = dict(user="tlsonly", password=TLS_ROLE_PASSWORD, host="localhost",
              sslmode="verify-full", sslrootcert=str(tls.certs["ca.crt"]))
    db_name = f"tls_{os.getpid()}_{threading.get_ident() % 10000}"
    conn = dbapi.connect(tls.url(**kw), autocommit=True)
    conn.cursor().execute(f'CREATE DATABASE "{db_name}"')
    conn.close()
    url = tls.url(db=db_name, **kw)
    assert cmbagent_db.migrate(url) == cmbagent_db.current(url) is not None  # the migrator
    with cmbagent_db.get_db_session(url) as db:  # pooled session connections
        chat = Session(name="tls")
        run = WorkflowRun(session_id=chat.id)
        db.add_all([chat, run])
        db.commit()
        req = approvals.request(db, run.id, "plan_approval", {"plan": 1})
    resolver = threading.Timer(0.3, lambda: _resolve(url, req.id))
    resolver.start()
    done = approvals.wait(req.id, timeout=20, url=url)  # the waiter's own connection
    resolver.join()
    assert done.status == "resolved" and done.resolution == "approved"
    assert ssl_in_use(url)
    cmbagent_db.dispose_engines()


def _resolve(url: str, approval_id: str) -> None:
    with cmbagent_db.get_db_session(url) as db:
        assert approvals.resolve(db, approval_id, "approved")


# ------------------------------------------------------------------ passwords and the environment


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _logs_in(url: str) -> bool:
    conn = dbapi.connect(url)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    ok = cur.fetchone() == (1,)
    conn.close()
    return ok


def test_a_password_comes_from_the_url_pgpassword_or_pgpass(pg_server, no_libpq_env, monkeypatch):
    url = pg_server.admin_url
    bare = _without_password(url)
    assert _logs_in(url)
    with pytest.raises(OperationalError, match="password"):
        dbapi.connect(bare)
    monkeypatch.setenv("PGPASSWORD", conftest.PG_PASSWORD)
    assert _logs_in(bare)
    monkeypatch.delenv("PGPASSWORD")
    parts = urlsplit(url)
    pgpass = no_libpq_env / ".pgpass"
    pgpass.write_text(f"{parts.hostname}:{parts.port}:*:{parts.username}:{conftest.PG_PASSWORD}\n")
    pgpass.chmod(0o600)
    assert _logs_in(bare)
    pgpass.chmod(0o644)  # others may read it: libpq does not use it, and says so
    with pytest.raises(OperationalError, match="chmod 0600") as info:
        dbapi.connect(bare)
    assert conftest.PG_PASSWORD not in str(info.value)
    moved = no_libpq_env / "elsewhere"
    pgpass.rename(moved)
    moved.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(moved))
    assert _logs_in(bare)


def test_a_wrong_password_is_an_operational_error_without_it(pg_server, no_libpq_env, monkeypatch):
    wrong = "not-the-Pa55word"
    parts = urlsplit(pg_server.admin_url)
    url = urlunsplit(parts._replace(netloc=f"{parts.username}:{wrong}@{parts.hostname}:{parts.port}"))
    with pytest.raises(OperationalError, match="password authentication failed") as info:
        dbapi.connect(url)
    assert wrong not in str(info.value)
    monkeypatch.setenv("PGPASSWORD", wrong)
    with pytest.raises(OperationalError) as info:
        dbapi.connect(_without_password(pg_server.admin_url))
    assert wrong not in str(info.value)


def test_host_port_user_and_database_come_from_the_environment(pg_server, no_libpq_env, monkeypatch):
    db_url = pg_server.create_database()
    parts = urlsplit(db_url)
    monkeypatch.setenv("PGHOST", parts.hostname)
    monkeypatch.setenv("PGPORT", str(parts.port))
    monkeypatch.setenv("PGUSER", parts.username)
    monkeypatch.setenv("PGPASSWORD", conftest.PG_PASSWORD)
    monkeypatch.setenv("PGDATABASE", parts.path.lstrip("/"))
    monkeypatch.setenv("PGAPPNAME", "cmbagent-env-test")
    conn = dbapi.connect("postgresql://")
    cur = conn.cursor()
    cur.execute("SELECT current_database(), current_setting('application_name')")
    assert cur.fetchone() == (parts.path.lstrip("/"), "cmbagent-env-test")
    conn.close()


def test_a_unix_socket_directory_is_a_host(pg_server, no_libpq_env):
    if pg_server.cluster is None:
        pytest.skip("the server of the URL given to the tests has no socket directory here")
    sock = pg_server.cluster.tmpdir
    url = f"postgresql://{conftest.PG_ROLE}@/postgres?host={sock}&port={pg_server.cluster.port}"
    conn = dbapi.connect(url)
    cur = conn.cursor()
    cur.execute("SELECT inet_server_addr() IS NULL")  # NULL over a Unix-domain socket
    assert cur.fetchone() == (True,)
    conn.close()

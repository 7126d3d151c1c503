#!/usr/bin/env bash
# The one command that installs what the tests need and runs every test:
#
#     bash scripts/test.sh [extra pytest arguments...]
#
# On a fresh Debian/Ubuntu machine, as root or as a normal user. Steps:
#   1. system packages: PostgreSQL server binaries (initdb, pg_ctl), openssl, pgbouncer, python3-venv,
#      a C compiler, libsqlite3-dev; installed with apt-get when missing and we are root, else it says how.
#      Rust (cargo >= the rust-version in Cargo.toml) must come from https://rustup.rs.
#   2. virtualenv .venv (created once, reused), pip install -r requirements-test.txt
#   3. build and install the package into .venv: maturin develop --release
#   4. cargo test                        (Rust unit tests of the pure core)
#   5. python -m pytest tests -q "$@"    (SQLite and a throwaway PostgreSQL server)
#   6. python -m mypy.stubtest cmbagent_db [--allowlist stubtest-allowlist.txt]
# Any failure stops the script with a non-zero exit status (pytest's 5, "no tests ran",
# included).
#
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default .venv),
# CMBAGENT_DB_TEST_BACKENDS (default sqlite,postgresql), CMBAGENT_DB_TEST_PG_URL (use this
# server instead of starting one), CMBAGENT_DB_TEST_PG_BINDIR (where initdb/pg_ctl live),
# CMBAGENT_DB_TEST_PGBOUNCER (a pgbouncer binary other than the one on PATH).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac

if [ -d "$HOME/.cargo/bin" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi
export PATH

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# ---------------------------------------------------------------------------- 1. system
needs_pg() {
    local backends="${CMBAGENT_DB_TEST_BACKENDS:-sqlite,postgresql}"
    case ",${backends// /}," in
        *,postgresql,* | *,postgres,* | *,pg,*) return 0 ;;
        *) return 1 ;;
    esac
}

needs_pg_binaries() {
    [ -z "${CMBAGENT_DB_TEST_PG_URL:-}" ] || return 1
    needs_pg
}

find_pg_bindir() {
    local d
    if [ -n "${CMBAGENT_DB_TEST_PG_BINDIR:-}" ]; then
        d="$CMBAGENT_DB_TEST_PG_BINDIR"
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
        return 1
    fi
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    fi
    for d in /usr/lib/postgresql/15/bin $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    done
    if command -v initdb >/dev/null 2>&1; then
        d="$(dirname "$(command -v initdb)")"
        [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    fi
    return 1
}

step "checking system prerequisites"
apt_pkgs=()
if needs_pg_binaries && ! find_pg_bindir >/dev/null; then
    apt_pkgs+=(postgresql)
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    [ "$PYTHON" = python3 ] || die "PYTHON=$PYTHON not found"
    apt_pkgs+=(python3 python3-venv)
elif [ ! -x "$VENV/bin/python" ] && ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    [ "$PYTHON" = python3 ] || die "$PYTHON cannot create virtualenvs (no venv/ensurepip module)"
    apt_pkgs+=(python3-venv)
fi
if ! command -v cc >/dev/null 2>&1; then
    apt_pkgs+=(gcc libc6-dev)
fi
# The TLS tests make their certificate authority and certificates with openssl.
if needs_pg_binaries && ! command -v openssl >/dev/null 2>&1; then
    apt_pkgs+=(openssl)
fi
# The PgBouncer tests start a pgbouncer in transaction mode in front of the server (the
# throwaway one or CMBAGENT_DB_TEST_PG_URL's).
if needs_pg && [ -z "${CMBAGENT_DB_TEST_PGBOUNCER:-}" ] \
        && ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    apt_pkgs+=(pgbouncer)
fi
# The module links the system's SQLite (the library Python's sqlite3 uses: one copy per
# process), so building it needs the headers and the linker name.
if [ ! -e /usr/include/sqlite3.h ] && ! pkg-config --exists sqlite3 2>/dev/null; then
    apt_pkgs+=(libsqlite3-dev)
fi

if [ "${#apt_pkgs[@]}" -gt 0 ]; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
        step "installing system packages: ${apt_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if [[ " ${apt_pkgs[*]} " == *" postgresql "* ]] && [ ! -e /etc/postgresql-common/createcluster.conf ]; then
            # The tests start their own throwaway server: keep the package from creating
            # and starting a system-wide "main" cluster on port 5432.
            mkdir -p /etc/postgresql-common/createcluster.d
            echo "create_main_cluster = false" \
                > /etc/postgresql-common/createcluster.d/cmbagent-db-tests.conf
            echo "note: wrote /etc/postgresql-common/createcluster.d/cmbagent-db-tests.conf (no main cluster)"
        fi
        apt-get update
        apt-get install -y --no-install-recommends --no-upgrade "${apt_pkgs[@]}"
    else
        {
            echo "error: missing system packages: ${apt_pkgs[*]}"
            echo "install them, e.g. (Debian/Ubuntu):"
            echo "    sudo apt-get update && sudo apt-get install -y ${apt_pkgs[*]}"
            if [[ " ${apt_pkgs[*]} " == *" postgresql "* ]]; then
                echo "or run the tests against an existing server whose user may CREATE DATABASE:"
                echo "    CMBAGENT_DB_TEST_PG_URL=postgresql://user:pass@host:5432/postgres bash scripts/test.sh"
                echo "or without PostgreSQL (not for CI): CMBAGENT_DB_TEST_BACKENDS=sqlite bash scripts/test.sh"
            fi
        } >&2
        exit 1
    fi
fi
if needs_pg_binaries; then
    CMBAGENT_DB_TEST_PG_BINDIR="$(find_pg_bindir)" \
        || die "PostgreSQL server binaries still not found after installation"
    export CMBAGENT_DB_TEST_PG_BINDIR
    echo "PostgreSQL binaries: $CMBAGENT_DB_TEST_PG_BINDIR ($("$CMBAGENT_DB_TEST_PG_BINDIR/initdb" --version))"
fi
if ! command -v cargo >/dev/null 2>&1; then
    die "cargo not found. Install Rust (the version Debian packages is too old):
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    . \"\$HOME/.cargo/env\""
fi
echo "$(cargo --version), $("$PYTHON" --version 2>&1)"

# ---------------------------------------------------------------------------- 2. venv
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    step "virtualenv $VENV is broken, recreating it"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    step "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
fi
VPY="$VENV/bin/python"

step "installing test requirements (requirements-test.txt)"
"$VPY" -m pip install --disable-pip-version-check -q -r requirements-test.txt

# ---------------------------------------------------------------------------- 3. package
step "building and installing cmbagent-db into $VENV (maturin develop --release)"
VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" "$VENV/bin/maturin" develop --release
"$VPY" -c 'import cmbagent_db, sys; print("cmbagent_db imported from", cmbagent_db.__file__)'

# ---------------------------------------------------------------------------- 4. cargo
step "cargo test"
cargo test

# ---------------------------------------------------------------------------- 5. pytest
step "pytest"
"$VPY" -m pytest tests -q "$@"

# ---------------------------------------------------------------------------- 6. stubs
step "mypy stubtest"
stubtest_args=(cmbagent_db)
if [ -f stubtest-allowlist.txt ]; then
    stubtest_args+=(--allowlist stubtest-allowlist.txt)
fi
MYPYPATH="$ROOT/python${MYPYPATH:+:$MYPYPATH}" "$VPY" -m mypy.stubtest "${stubtest_args[@]}"

step "all tests passed"

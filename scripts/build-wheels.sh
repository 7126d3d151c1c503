#!/usr/bin/env bash
# Builds what a package index takes, into OUT (default dist/):
#
#     bash scripts/build-wheels.sh [OUT]
#
#   cmbagent_db-<version>-cp310-abi3-manylinux_2_28_x86_64.whl
#       one wheel for CPython 3.10 and newer (the stable ABI) on x86_64 Linux with glibc 2.28
#       or newer (Debian 10+, Ubuntu 18.10+, RHEL 8+, Fedora 29+); installs without Rust or a
#       C compiler.
#   cmbagent_db-<version>.tar.gz
#       the sdist: `pip install` of it builds from source for the interpreter at hand, as
#       `pip install .` does (needs Rust, a C compiler and libsqlite3-dev).
#
# Needs cargo and a Python 3.10+ (PYTHON, default python3). Installs requirements-build.txt
# (maturin; ziglang, whose zig links against glibc 2.28 from any machine; auditwheel) into
# VENV (default .venv). The Rust build of the wheel goes to target/<triple>/, beside the
# development build in target/release/.
#
# SQLite: the wheel is NOT linked against libsqlite3 (a manylinux wheel may name only the C
# library and its companions). Its SQLite symbols are left for the loader, and
# cmbagent_db._sqlite_library makes the library of Python's own sqlite3 module global before
# the native module loads, so both use one copy (see README "Installing").
#
# Other platforms: TARGET=aarch64-unknown-linux-gnu (after `rustup target add` of it) builds
# the same wheel for 64-bit ARM; MANYLINUX=2_17 an older glibc baseline. Only x86_64 with
# manylinux_2_28 is built and tested by CI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-$ROOT/dist}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
TARGET="${TARGET:-x86_64-unknown-linux-gnu}"
MANYLINUX="${MANYLINUX:-2_28}"
if [ -d "$HOME/.cargo/bin" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    step "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
step "installing build requirements (requirements-build.txt)"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements-build.txt

# libsqlite3-sys finds SQLite through pkg-config in $SQLITE3_LIB_DIR/pkgconfig first: a
# sqlite3.pc there with no libraries keeps -lsqlite3 off the link line. Its header directory
# is only read when bindings are generated; libsqlite3-sys's own copy of sqlite3.h serves.
link_dir="$ROOT/target/wheel-sqlite"
mkdir -p "$link_dir/pkgconfig"
cat >"$link_dir/pkgconfig/sqlite3.pc" <<'PC'
Name: SQLite
Description: the SQLite library of the interpreter, bound when the module is loaded
Version: 3.35.0
Libs:
Cflags:
PC
sqlite_src="$(cargo metadata --format-version 1 | "$VENV/bin/python" -c '
import json, pathlib, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "libsqlite3-sys":
        print(pathlib.Path(p["manifest_path"]).parent / "sqlite3")
        break
')"

mkdir -p "$OUT"
step "wheel: abi3 (CPython 3.10+), manylinux_${MANYLINUX}, $TARGET"
SQLITE3_LIB_DIR="$link_dir" SQLITE3_INCLUDE_DIR="$sqlite_src" \
    VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" \
    "$VENV/bin/maturin" build --release --zig --target "$TARGET" \
    --compatibility "manylinux_${MANYLINUX}" --auditwheel check \
    --features python,pyo3/extension-module,pyo3/abi3-py310 --out "$OUT"

step "sdist"
VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" "$VENV/bin/maturin" sdist --out "$OUT"

step "built"
ls -l "$OUT"

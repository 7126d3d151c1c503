"""cmbagent_db uses the SQLite library of Python's own sqlite3 module, wherever it comes from.

Each case starts a fresh interpreter whose ``_sqlite3`` gets its SQLite from somewhere else,
made from real libraries and a real build of SQLite:
- the system's libsqlite3 (this interpreter, as Debian and pyenv Pythons have it);
- a copy under another name next to the interpreter (``patchelf`` renames the system
  library and points a copy of ``_sqlite3`` at it), as self-contained Pythons carry;
- SQLite compiled into ``_sqlite3`` itself (a module built here from the amalgamation that
  libsqlite3-sys ships), with its symbols exported or hidden.
The native module must bind to the interpreter's library in every case it can, and say so
with a ``SQLiteLibraryWarning`` naming both files in the one it cannot.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import cmbagent_db
from cmbagent_db import _native

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF loader")

# Imports in the order given, then reports which library each side reached and what warned.
PROBE = r"""
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if sys.argv[1] == "sqlite3-first":
        import _sqlite3
        import cmbagent_db
    else:
        import cmbagent_db
        import _sqlite3
from cmbagent_db import _native
with open("/proc/self/maps") as maps:
    mapped = sorted({l.split()[-1] for l in maps if "libsqlite3" in l.split()[-1]})
print(json.dumps({
    "native": _native.sqlite_library()[0],
    "python": _sqlite3.__file__,
    "python_version": _sqlite3.sqlite_version,
    "mapped": mapped,
    "warnings": [str(w.message) for w in caught
                 if issubclass(w.category, cmbagent_db.SQLiteLibraryWarning)],
}))
"""

# cmbagent's pattern: this package commits while Python's sqlite3 (SQLAlchemy) opens and
# closes connections on the same file. With two SQLite copies the closes drop our locks and
# WAL, and commits are lost.
SHARED_FILE = r"""
import sqlite3, sys
import cmbagent_db
from cmbagent_db.models import Session
url = "sqlite:///" + sys.argv[1]
cmbagent_db.init_database(url)
held = cmbagent_db.get_db_session(url)
held.query(Session).all()
for i in range(3):
    db = cmbagent_db.get_db_session(url)
    db.add(Session(name=f"ours-{i}"))
    db.commit()
    db.close()
    c = sqlite3.connect(sys.argv[1])
    c.execute("SELECT count(*) FROM sessions").fetchone()
    c.close()
held.close()
"""

SHIM = r"""
#include <Python.h>
#include "sqlite3.h"
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_sqlite3", NULL, -1, NULL};
__attribute__((visibility("default"))) PyMODINIT_FUNC PyInit__sqlite3(void) {
    PyObject *m = PyModule_Create(&def);
    if (m != NULL && PyModule_AddStringConstant(m, "sqlite_version", sqlite3_libversion()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
"""

EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


def run(script, *args, pythonpath=None, timeout=120):
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True, text=True, env=env, timeout=timeout, cwd="/",
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def probe(order, pythonpath=None):
    return json.loads(run(PROBE, order, pythonpath=pythonpath))


def system_library():
    import _sqlite3  # noqa: F401  (maps the interpreter's library)

    with open("/proc/self/maps") as maps:
        libs = {line.split()[-1] for line in maps if "libsqlite3" in line.split()[-1]}
    assert len(libs) == 1, libs
    return Path(libs.pop())


def sessions_in(path):
    import sqlite3

    c = sqlite3.connect(path)
    try:
        return sorted(n for (n,) in c.execute("SELECT name FROM sessions"))
    finally:
        c.close()


def tool(name):
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} not found: pip install -r requirements-test.txt / a C compiler"
    return found


@pytest.fixture(scope="module")
def renamed_copy(tmp_path_factory):
    """A directory whose _sqlite3 links libsqlite3alt.so.0: the system library renamed."""
    root = tmp_path_factory.mktemp("renamed")
    (root / "lib").mkdir()
    (root / "dyn").mkdir()
    lib = root / "lib" / "libsqlite3alt.so.0"
    shutil.copy(system_library(), lib)
    patchelf = tool("patchelf")
    subprocess.run([patchelf, "--set-soname", lib.name, str(lib)], check=True)
    import _sqlite3

    module = root / "dyn" / Path(_sqlite3.__file__).name
    shutil.copy(_sqlite3.__file__, module)
    subprocess.run(
        [patchelf, "--replace-needed", "libsqlite3.so.0", lib.name,
         "--set-rpath", str(lib.parent), str(module)],
        check=True,
    )
    return root / "dyn", lib


def amalgamation():
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
    )
    for package in json.loads(out.stdout)["packages"]:
        if package["name"] == "libsqlite3-sys":
            found = Path(package["manifest_path"]).parent / "sqlite3"
            if (found / "sqlite3.c").exists():
                return found
    pytest.fail("libsqlite3-sys's SQLite amalgamation not found (cargo fetch)")


@pytest.fixture(scope="module")
def compiled_in(tmp_path_factory):
    """Two _sqlite3 modules with SQLite compiled in: exported symbols, and hidden ones."""
    root = tmp_path_factory.mktemp("compiled-in")
    source = amalgamation()
    cc = tool("cc")
    include = sysconfig.get_paths()["include"]
    (root / "shim.c").write_text(SHIM)
    obj = root / "sqlite3.o"
    subprocess.run(
        [cc, "-c", "-fPIC", "-O0", f"-I{source}", str(source / "sqlite3.c"), "-o", str(obj)],
        check=True,
    )
    subprocess.run(["ar", "rcs", str(root / "libsqlite3.a"), str(obj)], check=True)
    dirs = {}
    for kind, hide in (("exported", []), ("hidden", ["-Wl,--exclude-libs,ALL"])):
        out = root / kind
        out.mkdir()
        subprocess.run(
            [cc, "-shared", "-fPIC", "-O0", f"-I{include}", f"-I{source}", str(root / "shim.c"),
             "-o", str(out / f"_sqlite3{EXT_SUFFIX}"), f"-L{root}", *hide, "-lsqlite3", "-lm"],
            check=True,
        )
        dirs[kind] = out
    return dirs


@pytest.mark.parametrize("order", ["sqlite3-first", "cmbagent_db-first"])
def test_this_interpreter_shares_one_library(order):
    seen = probe(order)
    assert seen["mapped"] == [str(system_library())]
    assert Path(seen["native"]).resolve() == system_library().resolve()
    assert seen["warnings"] == []


def test_this_process_reports_the_library_it_uses():
    file, version, address = _native.sqlite_library()
    assert Path(file).resolve() == system_library().resolve()
    import sqlite3

    assert version == sqlite3.sqlite_version == _native.sqlite_version
    assert address == _native.sqlite_library()[2]


@pytest.mark.parametrize("order", ["sqlite3-first", "cmbagent_db-first"])
def test_a_library_of_another_name_is_shared(renamed_copy, order):
    pythonpath, lib = renamed_copy
    seen = probe(order, pythonpath)
    assert Path(seen["python"]).parent == pythonpath
    # The system library is loaded too (the native module names it), but every call goes
    # to the interpreter's copy.
    assert seen["native"] == str(lib)
    assert seen["warnings"] == []


def test_a_library_of_another_name_loses_no_commit(renamed_copy, tmp_path):
    pythonpath, _ = renamed_copy
    path = tmp_path / "shared.db"
    run(SHARED_FILE, path, pythonpath=pythonpath)
    assert sessions_in(path) == ["ours-0", "ours-1", "ours-2"]


def test_sqlite_compiled_into_the_module_and_exported_is_shared(compiled_in):
    seen = probe("cmbagent_db-first", compiled_in["exported"])
    assert seen["native"] == seen["python"]
    assert seen["warnings"] == []


def test_sqlite_compiled_in_and_hidden_is_named_in_a_warning(compiled_in):
    seen = probe("sqlite3-first", compiled_in["hidden"])
    assert Path(seen["native"]).resolve() == system_library().resolve()
    [message] = seen["warnings"]
    assert seen["python"] in message
    assert seen["native"] in message
    assert seen["python_version"] in message
    assert "lose commits" in message
    assert "cmbagent_db.sqlalchemy" in message


def test_the_warning_is_a_runtime_warning():
    assert issubclass(cmbagent_db.SQLiteLibraryWarning, RuntimeWarning)

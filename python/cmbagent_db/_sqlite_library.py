"""Load the native module so that it uses the SQLite library of Python's own ``sqlite3``.

Two copies of SQLite in one process lose each other's commits on a shared database file:
closing a connection of one releases the POSIX locks the other holds and deletes the WAL it
is writing to. cmbagent opens its database through Python's ``sqlite3`` (SQLAlchemy) as well
as through this package, so both must reach one library.

A development build of the native module is linked against ``libsqlite3.so.0``; the wheels
are not (a manylinux wheel may only name the C library), so their SQLite symbols are bound at
load time to whatever the process holds. Before the module is loaded, this module
finds the object that holds the interpreter's SQLite: a system ``libsqlite3`` (Debian and
Ubuntu Pythons, pyenv and python.org builds), a ``libsqlite3`` of the interpreter's own
(conda), or SQLite compiled into ``_sqlite3`` or the interpreter. It makes that object's
symbols global (``dlopen(RTLD_NOLOAD | RTLD_GLOBAL)``), so the dynamic loader binds the
native module's SQLite calls to it: the global scope is searched before a module's own
dependencies. After loading, the two are compared by the address of ``sqlite3_libversion``;
where they differ (an interpreter whose SQLite is compiled in and hidden, or a build with the
``bundled-sqlite`` feature), :class:`SQLiteLibraryWarning` names both files. An interpreter
without SQLite, or with a hidden one, gets the system's ``libsqlite3.so.0``.

The logic is Python because it must run before the native module exists in the process.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from types import ModuleType
from typing import Any, NamedTuple


# What the native module falls back to where the interpreter's SQLite cannot be shared.
SYSTEM_LIBRARY = "libsqlite3.so.0"


class SQLiteLibraryWarning(RuntimeWarning):
    """cmbagent_db and Python's ``sqlite3`` module use two different SQLite libraries."""


class _Found(NamedTuple):
    address: int | None  # of the interpreter's sqlite3_libversion; None: not visible
    file: str  # the object that holds it, or _sqlite3's file when it is not visible
    version: str


class _DlInfo(ctypes.Structure):
    dli_fname: bytes | None
    dli_fbase: int | None
    dli_sname: bytes | None
    dli_saddr: int | None
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _dladdr() -> Any:
    # glibc 2.34+ has dladdr in libc; older ones (manylinux_2_28's 2.28) in libdl.
    for name in (None, "libdl.so.2"):
        try:
            function = ctypes.CDLL(name).dladdr
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        function.restype = ctypes.c_int
        return function
    return None


def _file_of(address: int) -> str | None:
    dladdr = _dladdr()
    info = _DlInfo()
    if dladdr is None or not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname) or sys.executable


def _libversion_address(library: ctypes.CDLL) -> int | None:
    try:
        function = library.sqlite3_libversion
    except AttributeError:
        return None
    return ctypes.cast(function, ctypes.c_void_p).value


def _interpreter_sqlite() -> _Found | None:
    """Find the interpreter's SQLite and make its symbols global; None if it has none."""
    try:
        import _sqlite3
    except ImportError:
        return None
    version = str(getattr(_sqlite3, "sqlite_version", "?"))
    module_file = getattr(_sqlite3, "__file__", None)
    where = module_file or sys.executable
    # Already global (linked into the interpreter, or preloaded): every module binds to it.
    address = _libversion_address(ctypes.CDLL(None))
    if address is not None:
        return _Found(address, _file_of(address) or where, version)
    if module_file is None:
        return _Found(None, where, version)
    flags = os.RTLD_NOW | os.RTLD_NOLOAD
    try:
        address = _libversion_address(ctypes.CDLL(module_file, mode=flags))
        owner = _file_of(address) if address is not None else None
        if owner is None:
            return _Found(None, where, version)
        ctypes.CDLL(owner, mode=flags | os.RTLD_GLOBAL)
    except OSError:
        return _Found(None, where, version)
    return _Found(address, owner, version)


def _check(found: _Found, native: ModuleType) -> None:
    file, version, address = native.sqlite_library()
    if found.address == address:
        return
    where = "built into it, its symbols hidden" if found.address is None else "from it"
    warnings.warn(
        f"cmbagent_db uses the SQLite library {file or 'compiled into it'} ({version}), but "
        f"Python's sqlite3 module uses another copy ({found.file}, {where}, {found.version}). "
        "Two copies of SQLite in one process lose commits when both open the same database "
        "file: open cmbagent's database only through cmbagent_db (cmbagent_db.sqlalchemy's "
        "create_engine for SQLAlchemy models), or use a Python whose sqlite3 module links "
        "the system's libsqlite3.",
        SQLiteLibraryWarning,
        stacklevel=3,
    )


def load() -> ModuleType:
    """Import ``cmbagent_db._native`` bound to the interpreter's SQLite where possible."""
    found = _interpreter_sqlite() if hasattr(os, "RTLD_NOLOAD") else None
    if hasattr(os, "RTLD_GLOBAL") and (found is None or found.address is None):
        try:
            ctypes.CDLL(SYSTEM_LIBRARY, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        except OSError:
            pass  # a build linked against it names the problem below
    try:
        from cmbagent_db import _native
    except ImportError as exc:
        if "libsqlite3" not in str(exc) and "undefined symbol: sqlite3" not in str(exc):
            raise
        raise ImportError(
            f"cmbagent_db needs the SQLite library {SYSTEM_LIBRARY} (3.35 or newer), the one "
            f"Python's sqlite3 module normally uses, and this process has none: {exc}. "
            "Install it (Debian/Ubuntu: apt-get install libsqlite3-0; Fedora/RHEL: "
            "dnf install sqlite-libs)."
        ) from exc
    if found is not None:
        _check(found, native=_native)
    return _native

"""The migration engine, checked against the database's own catalogue.

Every assertion about the schema reads sqlite_master / PRAGMA (SQLite) or
information_schema / pg_catalog (PostgreSQL) directly, through tests/helpers.py
or raw SQL here, never through cmbagent_db's own reading code. The expected
schema is spec/SCHEMA.md (plus the seed for Stage 2), written out below by
hand so that a mistake in the implementation cannot hide in a shared table.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

import cmbagent_db
from helpers import (
    alembic_config,
    column_names,
    fetch_all,
    index_info,
    index_names,
    is_sqlite,
    raw_connect,
    row_count,
    sa_url,
    sqlite_path,
    table_names,
)

REVS = ["000_base", "001_session_states", "002_approvals_connections", "003_cmbagent_columns", "004_approval_changes"]
HEAD = REVS[-1]
STAGE2 = "002_approvals_connections"
DOWN = {rev: (REVS[i - 1] if i else None) for i, rev in enumerate(REVS)}
# SQLite's change log of approval requests (004) is the watcher's, not one of the tables.
BOOKKEEPING = {"alembic_version", "cmbagent_db_migrations", "cmbagent_db_approval_changes"}
COLUMNS_ADDED = "003_cmbagent_columns"


def has_added_columns(rev: Optional[str]) -> bool:
    """Whether ``rev`` is at or after the revision adding cmbagent's columns."""
    return rev is not None and REVS.index(rev) >= REVS.index(COLUMNS_ADDED)

# --------------------------------------------------------------------------------------
# The expected schema (spec/SCHEMA.md and the seed), revision by revision
# --------------------------------------------------------------------------------------

TABLES_AT: Dict[Optional[str], List[str]] = {
    None: [],
    "000_base": ["sessions", "workflow_runs"],
    "001_session_states": ["sessions", "workflow_runs", "session_states"],
    STAGE2: ["sessions", "workflow_runs", "session_states", "approval_requests", "active_connections"],
    COLUMNS_ADDED: ["sessions", "workflow_runs", "session_states", "approval_requests", "active_connections"],
    HEAD: ["sessions", "workflow_runs", "session_states", "approval_requests", "active_connections"],
}

# Type families: str (VARCHAR(n)), text, int, bool, ts (TIMESTAMP without time zone),
# tstz (TIMESTAMP(timezone=True); plain TIMESTAMP on SQLite), json.
# (column, family, length, nullable)
COLUMNS: Dict[str, List[Tuple[str, str, Optional[int], bool]]] = {
    "sessions": [
        ("id", "str", 36, False),
        ("user_id", "str", 36, True),
        ("name", "str", 255, False),
        ("created_at", "ts", None, False),
        ("last_active_at", "ts", None, False),
        ("status", "str", 50, False),
        ("meta", "json", None, True),
        ("resource_limits", "json", None, True),
    ],
    "workflow_runs": [
        ("id", "str", 36, False),
        ("session_id", "str", 36, False),
        ("project_id", "str", 36, True),
        ("mode", "str", 50, False),
        ("agent", "str", 100, False),
        ("model", "str", 100, False),
        ("status", "str", 50, False),
        ("started_at", "ts", None, True),
        ("completed_at", "ts", None, True),
        ("last_heartbeat_at", "ts", None, True),
        ("checkpoint_frequency_minutes", "int", None, False),
        ("task_description", "text", None, True),
        ("meta", "json", None, True),
        ("branch_parent_id", "str", 36, True),
        ("is_branch", "bool", None, False),
        ("branch_depth", "int", None, False),
    ],
    "session_states": [
        ("id", "str", 36, False),
        ("session_id", "str", 36, False),
        ("mode", "str", 50, False),
        ("conversation_history", "json", None, True),
        ("context_variables", "json", None, True),
        ("plan_data", "json", None, True),
        ("current_phase", "str", 50, True),
        ("current_step", "int", None, True),
        ("status", "str", 20, True),
        ("created_at", "tstz", None, True),
        ("updated_at", "tstz", None, True),
        ("expires_at", "tstz", None, True),
        ("version", "int", None, True),
    ],
    "approval_requests": [
        ("id", "str", 36, False),
        ("run_id", "str", 36, False),
        ("session_id", "str", 36, True),
        ("approval_type", "str", 50, False),
        ("context", "json", None, False),
        ("status", "str", 20, True),
        ("resolution", "str", 20, True),
        ("result", "json", None, True),
        ("created_at", "tstz", None, True),
        ("expires_at", "tstz", None, False),
        ("resolved_at", "tstz", None, True),
    ],
    "active_connections": [
        ("id", "str", 36, False),
        ("task_id", "str", 100, False),
        ("session_id", "str", 36, True),
        ("server_instance", "str", 100, True),
        ("connected_at", "tstz", None, True),
        ("last_heartbeat", "tstz", None, True),
    ],
}

# What 003_cmbagent_columns adds: the columns cmbagent's models declare beyond the seed's.
ADDED_AT_HEAD: Dict[str, List[Tuple[str, str, Optional[int], bool]]] = {
    "workflow_runs": [
        ("parent_run_id", "str", 36, True),
        ("stage_number", "int", None, True),
        ("stage_name", "str", 100, True),
    ],
    "approval_requests": [
        ("step_id", "str", 36, True),
        ("requested_at", "ts", None, True),
        ("context_snapshot", "json", None, True),
        ("user_feedback", "text", None, True),
    ],
}


def columns_at(rev: Optional[str], table: str) -> List[Tuple[str, str, Optional[int], bool]]:
    return COLUMNS[table] + (ADDED_AT_HEAD.get(table, []) if has_added_columns(rev) else [])


# (column, referenced table, referenced column, ON DELETE)
FOREIGN_KEYS: Dict[str, Set[Tuple[str, str, str, str]]] = {
    "sessions": set(),
    "workflow_runs": {
        ("session_id", "sessions", "id", "CASCADE"),
        ("branch_parent_id", "workflow_runs", "id", "SET NULL"),
    },
    "session_states": {("session_id", "sessions", "id", "CASCADE")},
    "approval_requests": {
        ("run_id", "workflow_runs", "id", "CASCADE"),
        ("session_id", "sessions", "id", "SET NULL"),
    },
    "active_connections": {("session_id", "sessions", "id", "SET NULL")},
}


def foreign_keys_at(rev: Optional[str], table: str) -> Set[Tuple[str, str, str, str]]:
    if has_added_columns(rev) and table == "workflow_runs":
        return FOREIGN_KEYS[table] | {("parent_run_id", "workflow_runs", "id", "SET NULL")}
    return FOREIGN_KEYS[table]

# Indexes made by CREATE INDEX: (columns, unique, partial). SCHEMA.md names only the
# Stage 2 ones; for the three older tables the column lists are what is specified.
INDEX_COLUMNS: Dict[str, List[Tuple[Tuple[str, ...], bool, bool]]] = {
    "sessions": [(("user_id",), False, False), (("status",), False, False),
                 (("user_id", "status"), False, False)],
    "workflow_runs": [
        (("session_id",), False, False),
        (("mode",), False, False),
        (("agent",), False, False),
        (("status",), False, False),
        (("branch_parent_id",), False, False),
        (("session_id", "status"), False, False),
        (("agent", "status"), False, False),
    ],
    "workflow_runs@head": [(("parent_run_id",), False, False)],
    "session_states": [
        (("session_id",), False, False),
        (("status",), False, False),
        (("session_id", "status"), False, False),
        (("mode",), False, False),
        (("updated_at",), False, False),
    ],
}
NAMED_INDEXES: Dict[str, Dict[str, Tuple[Tuple[str, ...], bool, bool]]] = {
    "approval_requests": {
        "idx_approval_run_status": (("run_id", "status"), False, False),
        "idx_approval_session_id": (("session_id",), False, False),
        "idx_approval_expires": (("expires_at",), False, True),
    },
    "active_connections": {
        "idx_connection_task_id": (("task_id",), True, False),
        "idx_connection_session_id": (("session_id",), False, False),
        "idx_connection_heartbeat": (("last_heartbeat",), False, False),
    },
}

# --------------------------------------------------------------------------------------
# Catalogue readers (raw SQL, no cmbagent_db)
# --------------------------------------------------------------------------------------


def _sqlite_family(declared: str) -> Tuple[str, Optional[int]]:
    d = " ".join(declared.upper().split())
    m = re.fullmatch(r"(?:VARCHAR|CHARACTER VARYING|NVARCHAR) ?\( ?(\d+) ?\)", d)
    if m:
        return "str", int(m.group(1))
    families = {
        "TEXT": "text", "CLOB": "text",
        "INTEGER": "int", "INT": "int",
        "BOOLEAN": "bool",
        "TIMESTAMP": "ts", "DATETIME": "ts",
        "JSON": "json",
    }
    return families.get(d, f"?{declared}"), None


_PG_FAMILIES = {
    "character varying": "str",
    "text": "text",
    "integer": "int",
    "boolean": "bool",
    "timestamp without time zone": "ts",
    "timestamp with time zone": "tstz",
    "json": "json",
}


def catalogue_columns(url: str, table: str) -> Set[Tuple[str, str, Optional[int], bool]]:
    """(name, family, length, nullable) of every column, as the database declares it."""
    out = set()
    if is_sqlite(url):
        for _cid, name, declared, notnull, _default, _pk in fetch_all(
            url, f'PRAGMA table_info("{table}")'
        ):
            family, length = _sqlite_family(declared)
            out.add((name, family, length, not notnull))
    else:
        for name, data_type, length, nullable in fetch_all(
            url,
            "SELECT column_name, data_type, character_maximum_length, is_nullable "
            "FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        ):
            family = _PG_FAMILIES.get(data_type, f"?{data_type}")
            out.add((name, family, int(length) if length is not None else None, nullable == "YES"))
    return out


def expected_columns(url: str, table: str, rev: Optional[str] = HEAD) -> Set[Tuple[str, str, Optional[int], bool]]:
    out = set()
    for name, family, length, nullable in columns_at(rev, table):
        if is_sqlite(url) and family == "tstz":
            family = "ts"  # SQLite has no time zone flag: SQLAlchemy writes TIMESTAMP
        out.add((name, family, length, nullable))
    return out


_PG_DELETE_RULES = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL",
                    "d": "SET DEFAULT"}


def catalogue_foreign_keys(url: str, table: str) -> Set[Tuple[str, str, str, str]]:
    """(column, referenced table, referenced column, ON DELETE) of each foreign key:
    PRAGMA foreign_key_list on SQLite, pg_constraint on PostgreSQL."""
    if is_sqlite(url):
        rows = fetch_all(url, f'PRAGMA foreign_key_list("{table}")')
        # id, seq, table, from, to, on_update, on_delete, match
        return {(r[3], r[2], r[4], r[6].upper()) for r in rows}
    rows = fetch_all(
        url,
        """
        SELECT a.attname, cf.relname, af.attname, c.confdeltype
        FROM pg_constraint c
        JOIN pg_class t ON t.oid = c.conrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        JOIN pg_class cf ON cf.oid = c.confrelid
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        JOIN pg_attribute af ON af.attrelid = c.confrelid AND af.attnum = c.confkey[1]
        WHERE c.contype = 'f' AND n.nspname = current_schema() AND t.relname = ?
        """,
        (table,),
    )
    return {(r[0], r[1], r[2], _PG_DELETE_RULES[r[3]]) for r in rows}


def information_schema_foreign_keys(url: str, table: str) -> List[Tuple[str, str, str, str]]:
    """The same as catalogue_foreign_keys, from PostgreSQL's standard views: the FOREIGN KEY
    constraints of table_constraints, their ON DELETE rule from referential_constraints, the
    referencing column and (through the referenced key) the target table and column from
    key_column_usage. A sorted list, so a foreign key declared twice shows twice."""
    assert not is_sqlite(url)
    rows = fetch_all(
        url,
        """
        SELECT kcu.column_name, ref.table_name, ref.column_name, rc.delete_rule
        FROM information_schema.table_constraints tc
        JOIN information_schema.referential_constraints rc
          ON rc.constraint_schema = tc.constraint_schema
         AND rc.constraint_name = tc.constraint_name
        JOIN information_schema.key_column_usage kcu
          ON kcu.constraint_schema = tc.constraint_schema
         AND kcu.constraint_name = tc.constraint_name
         AND kcu.table_schema = tc.table_schema
         AND kcu.table_name = tc.table_name
        JOIN information_schema.key_column_usage ref
          ON ref.constraint_schema = rc.unique_constraint_schema
         AND ref.constraint_name = rc.unique_constraint_name
         AND ref.ordinal_position = kcu.position_in_unique_constraint
        WHERE tc.constraint_type = 'FOREIGN KEY'
          AND tc.table_schema = current_schema() AND tc.table_name = ?
        """,
        (table,),
    )
    return sorted(tuple(r) for r in rows)


def assert_foreign_keys(url: str, table: str, want: Set[Tuple[str, str, str, str]]) -> None:
    """Every catalogue reading of ``table``'s foreign keys is ``want``."""
    got = {"catalogue": sorted(catalogue_foreign_keys(url, table))}
    if not is_sqlite(url):
        got["information_schema"] = information_schema_foreign_keys(url, table)
    assert got == {reading: sorted(want) for reading in got}, table


def catalogue_index_names(url: str, table: str) -> Set[str]:
    """Names of every index on ``table`` as the catalogue lists them: sqlite_master on
    SQLite (its sqlite_autoindex_* entries included), pg_indexes on PostgreSQL."""
    if is_sqlite(url):
        rows = fetch_all(
            url, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,)
        )
    else:
        rows = fetch_all(
            url,
            "SELECT indexname FROM pg_indexes "
            "WHERE schemaname = current_schema() AND tablename = ?",
            (table,),
        )
    return {r[0] for r in rows}


def alembic_version_rows(url: str) -> List[str]:
    return sorted(r[0] for r in fetch_all(url, "SELECT version_num FROM alembic_version"))


def user_tables(url: str) -> List[str]:
    if is_sqlite(url) and not os.path.exists(sqlite_path(url)):
        return []
    return sorted(set(table_names(url)) - BOOKKEEPING)


def assert_schema_at(url: str, rev: Optional[str]) -> None:
    """The catalogue of ``url`` is exactly SCHEMA.md's at revision ``rev``."""
    tables = user_tables(url)
    assert tables == sorted(TABLES_AT[rev]), f"tables at {rev}"
    for table in tables:
        assert sorted(column_names(url, table)) == sorted(c[0] for c in columns_at(rev, table)), table
        assert catalogue_columns(url, table) == expected_columns(url, table, rev), table
        assert_foreign_keys(url, table, foreign_keys_at(rev, table))

        everything = index_info(url, table, include_constraints=True)
        backing = [v for v in everything.values() if v["constraint"]]
        assert [v["columns"] for v in backing] == [["id"]], (
            f"{table}: the only constraint-backed index must be the primary key's, "
            f"got {everything}"
        )
        created = {k: v for k, v in everything.items() if not v["constraint"]}
        # The catalogue's list of index names (sqlite_master / pg_indexes): the primary
        # key's, plus SCHEMA.md's names where it names them (the Stage 2 tables), else the
        # ones index_info found (checked by their columns below).
        backing_names = {k for k, v in everything.items() if v["constraint"]}
        want_names = set(NAMED_INDEXES[table]) if table in NAMED_INDEXES else set(created)
        assert sorted(catalogue_index_names(url, table)) == sorted(backing_names | want_names), table
        if table in NAMED_INDEXES:
            got = {
                name: (tuple(v["columns"]), v["unique"], v["partial"])
                for name, v in created.items()
            }
            assert got == NAMED_INDEXES[table], table
        else:
            got_cols = sorted(
                (tuple(v["columns"]), v["unique"], v["partial"]) for v in created.values()
            )
            want = INDEX_COLUMNS[table] + (INDEX_COLUMNS.get(f"{table}@head", []) if has_added_columns(rev) else [])
            assert got_cols == sorted(want), table
    if rev is None:
        if _exists(url) and "alembic_version" in table_names(url):
            assert alembic_version_rows(url) == []
    else:
        assert alembic_version_rows(url) == [rev]
        assert "cmbagent_db_migrations" in table_names(url)
    assert cmbagent_db.current(url) == rev


def _exists(url: str) -> bool:
    return not is_sqlite(url) or os.path.exists(sqlite_path(url))


def snapshot(url: str):
    """Everything a migration could change, read from the catalogue."""
    tables = table_names(url)
    snap = {
        "tables": tables,
        "columns": {t: sorted(catalogue_columns(url, t)) for t in tables},
        "indexes": {t: index_info(url, t, include_constraints=True) for t in tables},
        "rows": {t: row_count(url, t) for t in tables},
    }
    if "alembic_version" in tables:
        snap["alembic_version"] = alembic_version_rows(url)
    if "cmbagent_db_migrations" in tables:
        snap["migrations"] = sorted(
            repr(r) for r in fetch_all(url, "SELECT * FROM cmbagent_db_migrations")
        )
    return snap


def _norm_sql(sql: str) -> str:
    return " ".join(sql.replace('"', "").replace("`", "").split())


# --------------------------------------------------------------------------------------
# Walking the chain
# --------------------------------------------------------------------------------------


def test_upgrade_downgrade_walk_matches_schema(db_url):
    assert user_tables(db_url) == []

    assert cmbagent_db.migrate(db_url, "head") == HEAD
    assert_schema_at(db_url, HEAD)

    for rev in [STAGE2, "001_session_states", "000_base"]:
        assert cmbagent_db.migrate(db_url, rev) == rev
        assert_schema_at(db_url, rev)

    assert cmbagent_db.migrate(db_url, "base") is None
    assert_schema_at(db_url, None)
    # Alembic keeps its (now empty) version table at base.
    assert alembic_version_rows(db_url) == []

    for rev in REVS:
        assert cmbagent_db.migrate(db_url, rev) == rev
        assert_schema_at(db_url, rev)

    # Upgrading a database already at head is a no-op.
    before = snapshot(db_url)
    assert cmbagent_db.migrate(db_url, "head") == HEAD
    assert snapshot(db_url) == before


def test_downgrade_straight_to_base_and_back(db_url):
    cmbagent_db.migrate(db_url, "head")
    assert cmbagent_db.migrate(db_url, "base") is None
    assert_schema_at(db_url, None)
    assert cmbagent_db.migrate(db_url) == HEAD
    assert_schema_at(db_url, HEAD)


def test_stage2_indexes_exactly(migrated_url):
    assert index_names(migrated_url, "approval_requests") == [
        "idx_approval_expires",
        "idx_approval_run_status",
        "idx_approval_session_id",
    ]
    assert index_names(migrated_url, "active_connections") == [
        "idx_connection_heartbeat",
        "idx_connection_session_id",
        "idx_connection_task_id",
    ]
    for table in NAMED_INDEXES:
        info = index_info(migrated_url, table, include_constraints=True)
        # No column is indexed twice: each column leads at most one index.
        leading = [v["columns"][0] for v in info.values()]
        assert len(leading) == len(set(leading)), info


def test_expiry_index_is_partial(migrated_url):
    info = index_info(migrated_url, "approval_requests")
    assert info["idx_approval_expires"]["partial"] is True
    assert not any(v["partial"] for k, v in info.items() if k != "idx_approval_expires")
    if is_sqlite(migrated_url):
        (sql,), = fetch_all(
            migrated_url,
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?",
            ("idx_approval_expires",),
        )
        assert "WHERE status = 'pending'" in _norm_sql(sql), sql
        plan = fetch_all(
            migrated_url,
            "EXPLAIN QUERY PLAN SELECT * FROM approval_requests "
            "WHERE status = 'pending' AND expires_at < ?",
            ("2030-01-01 00:00:00.000000",),
        )
        detail = " ".join(str(r[-1]) for r in plan)
        assert "idx_approval_expires" in detail, detail
    else:
        (indexdef,), = fetch_all(
            migrated_url,
            "SELECT indexdef FROM pg_indexes "
            "WHERE schemaname = current_schema() AND indexname = ?",
            ("idx_approval_expires",),
        )
        assert "WHERE" in indexdef and "'pending'" in indexdef, indexdef
        assert "status" in indexdef.split("WHERE", 1)[1], indexdef


# --------------------------------------------------------------------------------------
# alembic_version: exactly what Alembic itself writes
# --------------------------------------------------------------------------------------

def _alembic_config(tmp_path: Path, url: str):
    return alembic_config(tmp_path, url, [(rev, DOWN[rev]) for rev in REVS])


def _alembic_version_state(url: str):
    """Rows and column definition of alembic_version (None when the table is absent)."""
    if not os.path.exists(sqlite_path(url)) or "alembic_version" not in table_names(url):
        return None
    return {
        "rows": sorted(fetch_all(url, "SELECT * FROM alembic_version")),
        "columns": fetch_all(url, "PRAGMA table_info(alembic_version)"),
        "indexes": sorted(
            (tuple(v["columns"]), v["unique"], v["partial"])
            for v in index_info(url, "alembic_version", include_constraints=True).values()
        ),
        "foreign_keys": fetch_all(url, "PRAGMA foreign_key_list(alembic_version)"),
    }


def _alembic_reads(url: str) -> Optional[str]:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(sa_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


ALEMBIC_STEPS = [
    ("upgrade", "head"),
    ("downgrade", "001_session_states"),
    ("downgrade", "base"),
    ("upgrade", "+1"),
    ("upgrade", "+1"),
    ("downgrade", "-1"),
    ("upgrade", HEAD),
    ("downgrade", "-2"),
    ("stamp", "head"),
    ("stamp", "base"),
    ("stamp", "001_session_states"),
    ("upgrade", "head"),
    ("downgrade", "base"),
]


def test_alembic_version_identical_to_alembic(sqlite_url, tmp_path):
    from alembic import command

    ours = sqlite_url
    theirs = f"sqlite:///{tmp_path / 'alembic.db'}"
    cfg = _alembic_config(tmp_path, theirs)

    for action, target in ALEMBIC_STEPS:
        getattr(command, action)(cfg, target)
        if action == "stamp":
            cmbagent_db.stamp(ours, target)
        else:
            cmbagent_db.migrate(ours, target)

        expected = _alembic_version_state(theirs)
        assert expected is not None
        assert _alembic_version_state(ours) == expected, f"after {action} {target}"
        alembic_rev = expected["rows"][0][0] if expected["rows"] else None
        # Each side reads the other's bookkeeping.
        assert cmbagent_db.current(ours) == alembic_rev, f"after {action} {target}"
        assert _alembic_reads(ours) == alembic_rev, f"after {action} {target}"


def test_current_reads_a_database_alembic_wrote(sqlite_url, tmp_path):
    from alembic import command

    theirs = f"sqlite:///{tmp_path / 'alembic.db'}"
    cfg = _alembic_config(tmp_path, theirs)
    command.upgrade(cfg, "001_session_states")
    assert cmbagent_db.current(theirs) == "001_session_states"
    command.upgrade(cfg, "head")
    assert cmbagent_db.current(theirs) == HEAD


# --------------------------------------------------------------------------------------
# Targets, history, stamp
# --------------------------------------------------------------------------------------


def test_history_and_revision_info():
    assert cmbagent_db.history() == REVS
    for rev in REVS:
        info = cmbagent_db.revision_info(rev)
        assert info["revision"] == rev
        assert info["down_revision"] == DOWN[rev]
        assert isinstance(info["description"], str) and info["description"].strip()
    with pytest.raises(cmbagent_db.MigrationError, match="no_such_rev"):
        cmbagent_db.revision_info("no_such_rev")


def test_relative_targets(db_url):
    assert cmbagent_db.current(db_url) is None
    assert cmbagent_db.migrate(db_url, "+1") == "000_base"
    assert cmbagent_db.current(db_url) == "000_base"
    assert cmbagent_db.migrate(db_url, "+4") == HEAD
    assert_schema_at(db_url, HEAD)
    assert cmbagent_db.migrate(db_url, "-3") == "001_session_states"
    assert_schema_at(db_url, "001_session_states")
    assert cmbagent_db.migrate(db_url, "-2") is None
    assert_schema_at(db_url, None)
    assert cmbagent_db.migrate(db_url, "+5") == HEAD
    assert cmbagent_db.migrate(db_url, "-2") == STAGE2
    assert_schema_at(db_url, STAGE2)
    assert cmbagent_db.migrate(db_url, "-3") is None
    assert cmbagent_db.migrate(db_url, "+2") == "001_session_states"
    assert_schema_at(db_url, "001_session_states")


def test_relative_target_out_of_range_is_refused(db_url):
    # Alembic: "Relative revision +2 didn't produce 2 migrations".
    cmbagent_db.migrate(db_url, "001_session_states")
    before = snapshot(db_url)
    for target in ("+4", "-3"):
        with pytest.raises(cmbagent_db.MigrationError):
            cmbagent_db.migrate(db_url, target)
        assert snapshot(db_url) == before


def test_stamp(db_url):
    cmbagent_db.stamp(db_url, "head")
    assert alembic_version_rows(db_url) == [HEAD]
    assert cmbagent_db.current(db_url) == HEAD
    assert user_tables(db_url) == [], "stamp must not run migrations"

    cmbagent_db.stamp(db_url, "base")
    assert alembic_version_rows(db_url) == []
    assert cmbagent_db.current(db_url) is None

    cmbagent_db.stamp(db_url, "001_session_states")
    assert alembic_version_rows(db_url) == ["001_session_states"]
    cmbagent_db.stamp(db_url, "000_base")
    assert alembic_version_rows(db_url) == ["000_base"]
    assert user_tables(db_url) == []

    with pytest.raises(cmbagent_db.MigrationError, match="no_such_rev"):
        cmbagent_db.stamp(db_url, "no_such_rev")
    assert alembic_version_rows(db_url) == ["000_base"]


def test_stamp_then_upgrade_runs_only_later_revisions(db_url):
    cmbagent_db.migrate(db_url, "000_base")
    cmbagent_db.stamp(db_url, "001_session_states")
    assert cmbagent_db.migrate(db_url, "head") == HEAD
    # 001 was stamped, not run: session_states was never created.
    assert user_tables(db_url) == sorted(
        ["sessions", "workflow_runs", "approval_requests", "active_connections"]
    )
    assert alembic_version_rows(db_url) == [HEAD]


# --------------------------------------------------------------------------------------
# Failure in the middle of a revision
# --------------------------------------------------------------------------------------


def test_failure_inside_a_revision_leaves_previous_revision_intact(db_url):
    cmbagent_db.migrate(db_url, "001_session_states")
    # Index names are schema-global on both backends: revision 002 creates
    # approval_requests and its indexes first, then fails on this name.
    fetch_all(db_url, "CREATE TABLE blocker (x INTEGER)")
    fetch_all(db_url, "CREATE INDEX idx_connection_session_id ON blocker (x)")

    with pytest.raises(cmbagent_db.Error):
        cmbagent_db.migrate(db_url, "head")

    assert cmbagent_db.current(db_url) == "001_session_states"
    assert alembic_version_rows(db_url) == ["001_session_states"]
    tables = table_names(db_url)
    assert "approval_requests" not in tables
    assert "active_connections" not in tables
    assert [r["revision"] for r in cmbagent_db.applied(db_url)] == REVS[:2]
    if is_sqlite(db_url):
        leftovers = fetch_all(
            db_url, "SELECT name FROM sqlite_master WHERE name LIKE 'idx_approval%'"
        )
        assert leftovers == []

    fetch_all(db_url, "DROP TABLE blocker")
    assert cmbagent_db.migrate(db_url, "head") == HEAD
    assert_schema_at(db_url, HEAD)
    assert [r["revision"] for r in cmbagent_db.applied(db_url)] == REVS


# --------------------------------------------------------------------------------------
# Checksum record
# --------------------------------------------------------------------------------------


def test_applied_records_and_checksum_drift(migrated_url):
    records = cmbagent_db.applied(migrated_url)
    assert [r["revision"] for r in records] == REVS
    for r in records:
        assert r["matches"] is True
        assert isinstance(r["checksum"], str) and r["checksum"]
        assert isinstance(r["applied_at"], datetime) and r["applied_at"].utcoffset() is not None
        assert isinstance(r["duration_ms"], int) and r["duration_ms"] >= 0
    assert row_count(migrated_url, "cmbagent_db_migrations") == len(REVS)
    assert cmbagent_db.check(migrated_url) == []

    fetch_all(
        migrated_url,
        "UPDATE cmbagent_db_migrations SET checksum = ? WHERE revision = ?",
        ("0" * 64, "001_session_states"),
    )
    assert cmbagent_db.check(migrated_url) == ["001_session_states"]
    by_rev = {r["revision"]: r for r in cmbagent_db.applied(migrated_url)}
    assert by_rev["001_session_states"]["matches"] is False
    assert by_rev["000_base"]["matches"] is True and by_rev[HEAD]["matches"] is True


def test_checksum_drift_blocks_upgrade_until_accepted(db_url):
    cmbagent_db.migrate(db_url, "001_session_states")
    fetch_all(
        db_url,
        "UPDATE cmbagent_db_migrations SET checksum = ? WHERE revision = ?",
        ("0" * 64, "000_base"),
    )
    before = snapshot(db_url)
    with pytest.raises(cmbagent_db.MigrationError, match="000_base"):
        cmbagent_db.migrate(db_url, "head")
    assert snapshot(db_url) == before
    # stamp accepts the database as it is (re-records this build's checksums).
    cmbagent_db.stamp(db_url, "001_session_states")
    assert cmbagent_db.check(db_url) == []
    assert cmbagent_db.migrate(db_url, "head") == HEAD
    assert_schema_at(db_url, HEAD)


def test_checksums_recorded_again_after_downgrade_and_upgrade(migrated_url):
    first = {r["revision"]: r["checksum"] for r in cmbagent_db.applied(migrated_url)}
    cmbagent_db.migrate(migrated_url, "000_base")
    assert [r["revision"] for r in cmbagent_db.applied(migrated_url)] == ["000_base"]
    cmbagent_db.migrate(migrated_url, "head")
    again = {r["revision"]: r["checksum"] for r in cmbagent_db.applied(migrated_url)}
    assert again == first
    assert cmbagent_db.check(migrated_url) == []


# --------------------------------------------------------------------------------------
# Destructive downgrades
# --------------------------------------------------------------------------------------


def _add_connections(url: str, n: int) -> None:
    for i in range(n):
        fetch_all(
            url,
            "INSERT INTO active_connections (id, task_id) VALUES (?, ?)",
            (f"conn-{i}", f"task-{i}"),
        )


def test_downgrade_refuses_to_drop_rows_without_force(migrated_url):
    _add_connections(migrated_url, 2)
    before = snapshot(migrated_url)

    with pytest.raises(cmbagent_db.MigrationError) as err:
        cmbagent_db.migrate(migrated_url, "001_session_states")
    msg = str(err.value)
    assert "active_connections" in msg and re.search(r"\b2\b", msg), msg
    assert snapshot(migrated_url) == before

    assert cmbagent_db.migrate(migrated_url, "001_session_states", force=True) == (
        "001_session_states"
    )
    assert_schema_at(migrated_url, "001_session_states")


def test_downgrade_to_base_names_the_table_with_rows(migrated_url):
    fetch_all(
        migrated_url,
        "INSERT INTO sessions (id, name, created_at, last_active_at, status) "
        "VALUES (?, ?, ?, ?, ?)",
        ("s-1", "kept", "2024-01-01 00:00:00.000000", "2024-01-01 00:00:00.000000", "active"),
    )
    with pytest.raises(cmbagent_db.MigrationError, match="sessions") as err:
        cmbagent_db.migrate(migrated_url, "base")
    assert re.search(r"\b1\b", str(err.value)), str(err.value)
    assert cmbagent_db.current(migrated_url) == HEAD
    assert row_count(migrated_url, "sessions") == 1

    # Emptying tables that are not dropped is not needed: a downgrade of 002 alone
    # touches no rows, so it goes through without force.
    assert cmbagent_db.migrate(migrated_url, "001_session_states") == "001_session_states"
    assert cmbagent_db.migrate(migrated_url, "base", force=True) is None
    assert_schema_at(migrated_url, None)


# --------------------------------------------------------------------------------------
# Concurrent migrators
# --------------------------------------------------------------------------------------

_CHILD = r"""
import os, sys, time
url, ready, go = sys.argv[1:4]
import cmbagent_db
open(ready, "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.001)
try:
    print(cmbagent_db.migrate(url, "head"))
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(1)
"""


def test_concurrent_migrators(db_url, tmp_path):
    n = 6
    go = tmp_path / "go"
    procs = []
    for i in range(n):
        ready = tmp_path / f"ready-{i}"
        procs.append(
            (
                ready,
                subprocess.Popen(
                    [sys.executable, "-c", _CHILD, db_url, str(ready), str(go)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    try:
        deadline = time.monotonic() + 120
        while not all(ready.exists() for ready, _ in procs):
            assert time.monotonic() < deadline, "children did not start"
            assert all(p.poll() is None for _, p in procs), [p.communicate() for _, p in procs]
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=180) + (p.returncode,) for _, p in procs]
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    for out, err, code in results:
        assert code == 0, err
        assert out.strip() == HEAD, (out, err)
    assert cmbagent_db.current(db_url) == HEAD
    assert alembic_version_rows(db_url) == [HEAD]
    assert [r["revision"] for r in cmbagent_db.applied(db_url)] == REVS
    assert row_count(db_url, "cmbagent_db_migrations") == len(REVS)
    assert_schema_at(db_url, HEAD)


# --------------------------------------------------------------------------------------
# Offline SQL
# --------------------------------------------------------------------------------------


def _state_of(url: str):
    if is_sqlite(url):
        path = sqlite_path(url)
        if not os.path.exists(path):
            return None
        return Path(path).read_bytes()
    return snapshot(url)


def _run_script(url: str, sql: str) -> None:
    conn = raw_connect(url)
    try:
        if is_sqlite(url):
            conn.executescript(sql)
        else:
            conn.cursor().execute(sql)
    finally:
        conn.close()


def test_migration_sql_is_offline_and_complete(db_url, new_db_url, backend):
    before = _state_of(db_url)
    sql = cmbagent_db.migration_sql(db_url, "head")
    assert _state_of(db_url) == before, "migration_sql touched the database"
    if is_sqlite(db_url):
        assert not os.path.exists(sqlite_path(db_url))

    norm = _norm_sql(sql)
    assert re.search(r"CREATE TABLE (IF NOT EXISTS )?approval_requests\b", norm, re.I), sql
    assert re.search(r"CREATE TABLE (IF NOT EXISTS )?alembic_version\b", norm, re.I), sql
    assert re.search(r"INSERT INTO alembic_version\b", norm, re.I), sql
    assert re.search(r"UPDATE alembic_version\b", norm, re.I), sql
    for rev in REVS:
        assert f"'{rev}'" in sql, rev

    # The script, run by hand, yields the schema an online upgrade yields.
    target = new_db_url(backend)
    _run_script(target, sql)
    tables = user_tables(target)
    assert tables == sorted(TABLES_AT[HEAD])
    for table in tables:
        assert catalogue_columns(target, table) == expected_columns(target, table), table
        assert_foreign_keys(target, table, foreign_keys_at(HEAD, table))
    assert index_info(target, "approval_requests") == index_info_after_online(backend, new_db_url)
    assert alembic_version_rows(target) == [HEAD]


def index_info_after_online(backend, new_db_url):
    url = new_db_url(backend)
    cmbagent_db.migrate(url, "head")
    return index_info(url, "approval_requests")


def test_migration_sql_ranges(db_url):
    up = cmbagent_db.migration_sql(db_url, HEAD, start="001_session_states")
    norm = _norm_sql(up)
    assert re.search(r"CREATE TABLE (IF NOT EXISTS )?approval_requests\b", norm, re.I)
    assert not re.search(r"CREATE TABLE (IF NOT EXISTS )?sessions\b", norm, re.I)

    down = cmbagent_db.migration_sql(db_url, "001_session_states", start=HEAD)
    norm = _norm_sql(down)
    assert re.search(r"DROP TABLE (IF EXISTS )?approval_requests\b", norm, re.I), down
    assert re.search(r"DROP TABLE (IF EXISTS )?active_connections\b", norm, re.I), down
    assert not re.search(r"DROP TABLE (IF EXISTS )?session_states\b", norm, re.I), down
    assert "'001_session_states'" in down
    assert _state_of(db_url) is None or not user_tables(db_url)


def test_migration_sql_never_connects():
    # Nothing listens on port 1: any connection attempt would fail.
    sql = cmbagent_db.migration_sql("postgresql://u:pw@127.0.0.1:1/nowhere", "head")
    assert "approval_requests" in sql
    norm = _norm_sql(sql).upper()
    assert "TIMESTAMP WITH TIME ZONE" in norm or "TIMESTAMPTZ" in norm


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_unknown_revision(db_url):
    with pytest.raises(cmbagent_db.MigrationError, match="no_such_rev"):
        cmbagent_db.migrate(db_url, "no_such_rev")
    assert user_tables(db_url) == []
    cmbagent_db.migrate(db_url, "head")
    with pytest.raises(cmbagent_db.MigrationError, match="no_such_rev"):
        cmbagent_db.migrate(db_url, "no_such_rev")
    assert cmbagent_db.current(db_url) == HEAD


@pytest.mark.parametrize("url", ["sqlite:/x", "notaurl", "sqlite://x.db", "sqlite:x.db"])
def test_malformed_url(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cmbagent_db.InterfaceError):
        cmbagent_db.migrate(url, "head")
    with pytest.raises(cmbagent_db.InterfaceError):
        cmbagent_db.current(url)
    assert list(tmp_path.iterdir()) == []


def test_unknown_url_parameter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cmbagent_db.InterfaceError, match="bogus"):
        cmbagent_db.migrate("sqlite:///x.db?bogus=1", "head")
    assert not (tmp_path / "x.db").exists()


def test_relative_sqlite_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cmbagent_db.migrate("sqlite:///rel.db", "head") == HEAD
    assert (tmp_path / "rel.db").exists()
    assert "approval_requests" in table_names(f"sqlite:///{tmp_path / 'rel.db'}")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "oracle://u:pw@h/db", "mssql+pyodbc://h/db"])
def test_unsupported_scheme(url):
    with pytest.raises(cmbagent_db.NotSupportedError) as err:
        cmbagent_db.migrate(url, "head")
    assert "pw@" not in str(err.value)


def test_missing_directory(tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "x.db"
    with pytest.raises(cmbagent_db.OperationalError) as err:
        cmbagent_db.migrate(f"sqlite:///{path}", "head")
    assert str(path.parent) in str(err.value)
    assert not (tmp_path / "no").exists()


def test_directory_instead_of_a_file(tmp_path):
    with pytest.raises(cmbagent_db.OperationalError) as err:
        cmbagent_db.migrate(f"sqlite:///{tmp_path}", "head")
    message = str(err.value)
    assert "is a directory" in message, message
    assert message.count(str(tmp_path)) == 1, message


def test_sqlite_messages_name_the_file_once(tmp_path):
    """SQLite's own text for a file it cannot open ends with the path the message already
    names (here: a path longer than SQLite accepts)."""
    directory = tmp_path / ("a" * 200) / ("b" * 200) / ("c" * 200)
    directory.mkdir(parents=True)
    path = directory / "x.db"
    with pytest.raises(cmbagent_db.OperationalError) as err:
        cmbagent_db.migrate(f"sqlite:///{path}", "head")
    message = str(err.value)
    assert "unable to open" in message, message
    assert message.count(str(path)) == 1, message


_UNWRITABLE_CHILD = r"""
import sys, cmbagent_db
try:
    cmbagent_db.migrate(sys.argv[1], "head")
except cmbagent_db.Error as exc:
    print(type(exc).__name__)
    print(exc)
else:
    print("NO ERROR")
"""


def test_unwritable_directory():
    directory = tempfile.mkdtemp(prefix="cmbagent-db-ro-")
    try:
        os.chmod(directory, 0o555)
        url = f"sqlite:///{directory}/x.db"
        if os.geteuid() != 0:
            with pytest.raises(cmbagent_db.OperationalError):
                cmbagent_db.migrate(url, "head")
        else:
            # root ignores permission bits: run the attempt without the capabilities
            # that let it (CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH).
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root and setpriv is not available")
            probe = subprocess.run(
                [setpriv, "--bounding-set=-dac_override,-dac_read_search", sys.executable,
                 "-c", f"open({directory + '/probe'!r}, 'w')"],
                capture_output=True,
            )
            if probe.returncode == 0:
                pytest.skip("cannot drop root's permission override here")
            proc = subprocess.run(
                [setpriv, "--bounding-set=-dac_override,-dac_read_search", sys.executable,
                 "-c", _UNWRITABLE_CHILD, url],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.stdout.splitlines()[:1] == ["OperationalError"], (proc.stdout, proc.stderr)
        assert os.listdir(directory) == []
    finally:
        os.chmod(directory, 0o755)
        shutil.rmtree(directory, ignore_errors=True)


def test_not_a_database_file(tmp_path):
    path = tmp_path / "garbage.db"
    data = b"this is not SQLite\0" + os.urandom(8192)
    path.write_bytes(data)
    url = f"sqlite:///{path}"
    with pytest.raises(cmbagent_db.OperationalError):
        cmbagent_db.migrate(url, "head")
    with pytest.raises(cmbagent_db.OperationalError):
        cmbagent_db.current(url)
    assert path.read_bytes() == data


def test_database_from_the_future(migrated_url):
    fetch_all(migrated_url, "UPDATE alembic_version SET version_num = ?", ("999_future",))
    before = snapshot(migrated_url)
    for target in ("head", "base", "001_session_states", "+1", "-1"):
        with pytest.raises(cmbagent_db.MigrationError, match="999_future"):
            cmbagent_db.migrate(migrated_url, target)
        assert snapshot(migrated_url) == before, target


def test_empty_database_from_the_future(db_url):
    cmbagent_db.stamp(db_url, "base")
    fetch_all(db_url, "INSERT INTO alembic_version (version_num) VALUES (?)", ("999_future",))
    before = snapshot(db_url)
    with pytest.raises(cmbagent_db.MigrationError, match="999_future"):
        cmbagent_db.migrate(db_url, "head")
    assert snapshot(db_url) == before
    assert user_tables(db_url) == []

"""Connection presence across server instances: which instance holds which task's
WebSocket, refreshed by heartbeats and forgotten when an instance stops beating.

    >>> from cmbagent_db import connections
    >>> # on connect and every few seconds:  connections.heartbeat(db, task_id, session_id=sid)
    >>> # routing:                           connections.owner(db, task_id, ttl_seconds=30)
    >>> # a janitor on any instance:          connections.reap_stale(db, ttl_seconds=30)

Every call that writes commits the session before returning.
"""

from __future__ import annotations

import socket
from typing import Iterable, List, Optional

from cmbagent_db._native import DbSession
from cmbagent_db import _native
from cmbagent_db._sessions import native
from cmbagent_db.models import ActiveConnection


def heartbeat(
    db: DbSession,
    task_id: str,
    session_id: Optional[str] = None,
    server_instance: Optional[str] = None,
) -> ActiveConnection:
    """Inserts or refreshes the task's connection row in one atomic statement (no
    read-then-insert race between instances) and returns it. ``server_instance`` defaults
    to this host's name. A given ``session_id`` replaces the stored one; None keeps it."""
    instance = server_instance if server_instance is not None else socket.gethostname()
    return _native.connection_heartbeat(native(db), task_id, instance, session_id)


def heartbeat_many(
    db: DbSession,
    task_ids: Iterable[str],
    session_ids: Optional[Iterable[Optional[str]]] = None,
    server_instance: Optional[str] = None,
) -> int:
    """``heartbeat`` for every connection an instance holds, in one statement (an upsert)
    whatever their number: one round trip per tick for 10,000 connections. ``session_ids``,
    when given, has one session id per task (None keeps the stored one); a task named
    twice counts once, with its last session id. Returns how many tasks were refreshed or
    inserted. ``ActiveConnection`` objects already loaded in ``db`` keep the values they
    had (``db.refresh(obj)`` reads them again)."""
    instance = server_instance if server_instance is not None else socket.gethostname()
    return _native.connection_heartbeat_many(native(db), task_ids, instance, session_ids)


def disconnect(db: DbSession, task_id: str) -> bool:
    """Forgets the task's connection; True if there was one."""
    return _native.connection_disconnect(native(db), task_id)


def release_instance(db: DbSession, server_instance: str) -> int:
    """Forgets every connection of a server instance, for its clean shutdown; returns how many."""
    return _native.connection_release_instance(native(db), server_instance)


def live(
    db: DbSession, ttl_seconds: float, session_id: Optional[str] = None
) -> List[ActiveConnection]:
    """Connections whose last heartbeat is at most ``ttl_seconds`` old."""
    return _native.connection_live(native(db), ttl_seconds, session_id)


def owner(db: DbSession, task_id: str, ttl_seconds: float) -> Optional[str]:
    """The instance holding ``task_id``, or None when its heartbeat is older than the TTL."""
    return _native.connection_owner(native(db), task_id, ttl_seconds)


def reap_stale(db: DbSession, ttl_seconds: float) -> List[str]:
    """Removes connections whose heartbeat is older than ``ttl_seconds`` (a crashed
    instance's rows); returns their task ids."""
    return _native.connection_reap_stale(native(db), ttl_seconds)


__all__ = ["heartbeat", "heartbeat_many", "disconnect", "release_instance", "live", "owner", "reap_stale"]

"""Durable approvals: a request survives restarts and disconnects, resolves exactly once,
and expires instead of hanging forever.

    >>> import cmbagent_db
    >>> from cmbagent_db import approvals
    >>> # in the workflow:  req = approvals.request(db, run.id, "plan_approval", {"plan": ...})
    >>> #                   done = approvals.wait(req.id, timeout=600)
    >>> # in the web handler, on any instance:  approvals.resolve(db, req_id, "approved")

Every call that writes commits the session before returning. State changes are single
compare-and-set statements, so any number of resolvers in any number of processes produce
exactly one winner. ``wait`` is woken by the database itself (PostgreSQL LISTEN/NOTIFY
through a trigger, SQLite's ``PRAGMA data_version``), so a plain SQL ``UPDATE`` from any
client wakes it too.
"""

from __future__ import annotations

import asyncio
import atexit
from typing import Any, Iterator, List, Optional

from cmbagent_db._native import DbSession
from cmbagent_db import _native
from cmbagent_db._sessions import native
from cmbagent_db.exceptions import ApprovalTimeout
from cmbagent_db.models import ApprovalRequest

#: The resolution values ``resolve`` accepts.
RESOLUTIONS = ("approved", "rejected", "modified")

#: Rows one sweep transaction expires at most, unless the caller says.
SWEEP_BATCH: int = _native.SWEEP_BATCH


def request(
    db: DbSession,
    run_id: str,
    approval_type: str,
    context: Any,
    timeout_seconds: float = 300,
    session_id: Optional[str] = None,
) -> ApprovalRequest:
    """Creates and commits a pending request that expires ``timeout_seconds`` from now."""
    approval = ApprovalRequest.create_pending(
        run_id, approval_type, context, timeout_seconds=timeout_seconds, session_id=session_id
    )
    db.add(approval)
    db.commit()
    return approval


def resolve(db: DbSession, approval_id: str, resolution: str, result: Any = None, *,
            session_id: Optional[str] = None, run_id: Optional[str] = None) -> bool:
    """Resolves a pending request with ``resolution`` (approved, rejected, modified) and an
    optional JSON ``result``. True for the single caller that resolved it; False when it was
    already resolved, cancelled or expired, or its deadline has passed (it is then marked
    expired). Raises ApprovalNotFound for an unknown id, ValueError for an unknown
    resolution, TypeError / ValueError for a result JSON cannot hold.

    With ``session_id`` and / or ``run_id`` (those of the WebSocket that sent the answer),
    only a request of that session / run is resolved, in the same single statement; a
    request of another one answers exactly as an unknown id (ApprovalNotFound), so an id
    alone answers nobody else's request."""
    return _native.approval_resolve(native(db), approval_id, resolution, result,
                                    session_id=session_id, run_id=run_id)


def cancel(db: DbSession, approval_id: str, *, session_id: Optional[str] = None,
           run_id: Optional[str] = None) -> bool:
    """Cancels a pending request; True if this call cancelled it. ``session_id`` /
    ``run_id`` scope it as for ``resolve``."""
    return _native.approval_cancel(native(db), approval_id, session_id=session_id,
                                   run_id=run_id)


def expire_overdue_batches(
    db: DbSession, now: Any = None, batch_size: int = SWEEP_BATCH
) -> Iterator[List[str]]:
    """Marks every pending request past its deadline (at ``now``, default the current
    time) expired, in transactions of at most ``batch_size`` rows, earliest deadlines
    first, and yields the ids of each batch once it is committed. The cost follows the
    number of overdue rows (the partial pending-expiry index), and no transaction holds
    SQLite's write lock for long: between two batches the sweep pauses as long as its
    batch took (10 to 100 ms), so other writers get in. Stopping the iteration early
    leaves the remaining requests pending for the next sweep."""
    return _native.approval_expire_overdue(native(db), now, batch_size)


def expire_overdue(db: DbSession, now: Any = None, batch_size: int = SWEEP_BATCH) -> List[str]:
    """``expire_overdue_batches`` run to the end; returns every id it expired. A janitor
    that only counts or logs can iterate the batches instead and keep none of them."""
    return [i for batch in expire_overdue_batches(db, now, batch_size) for i in batch]


def pending(
    db: DbSession, run_id: Optional[str] = None, session_id: Optional[str] = None
) -> List[ApprovalRequest]:
    """Requests still awaiting a human (pending and not past their deadline), oldest first."""
    return _native.approval_pending(native(db), run_id, session_id)


def wait(
    approval_id: str, timeout: Optional[float] = None, *, url: Optional[str] = None
) -> ApprovalRequest:
    """Blocks until the request is resolved and returns it, without holding the GIL or a
    transaction. Raises ApprovalExpired when the request's own deadline passes (it is marked
    expired), ApprovalCancelled when it is cancelled, ApprovalTimeout (a TimeoutError) when
    only ``timeout`` passes (the request stays pending), ApprovalNotFound for an unknown id,
    DataError for a status outside the request states (written by another client). A
    ``timeout`` longer than the clock can count (about 1e19 s) means no timeout. ``url``
    defaults to cmbagent's database URL.

    Every waiter of a database in a process shares one watcher thread and one connection
    (see ``wait_async``); a waiting thread only sleeps on a condition."""
    return _native.approval_wait(approval_id, timeout, url=url)


def _settle(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


async def wait_async(
    approval_id: str, timeout: Optional[float] = None, *, url: Optional[str] = None
) -> ApprovalRequest:
    """``wait`` for asyncio code: an awaitable the database's watcher thread completes
    through the event loop, with no thread or connection per waiter, so thousands can wait
    in one loop. Cancelling the awaiting task stops the wait at once (the request stays
    as it is)."""
    if timeout is not None:
        if not timeout >= 0:  # negative, or NaN
            raise ValueError(
                f"timeout must be a non-negative number of seconds or None, got {timeout}")
        if timeout > 1e18:  # beyond what the clock counts: no timeout, as for wait
            timeout = None
    loop = asyncio.get_running_loop()
    fut: "asyncio.Future[None]" = loop.create_future()

    def woke() -> None:  # the watcher's thread
        try:
            loop.call_soon_threadsafe(_settle, fut)
        except RuntimeError:  # the loop was closed meanwhile
            pass

    ticket = _native.approval_watch(approval_id, url=url, notify=woke)
    try:
        await asyncio.wait_for(fut, timeout)
        done = ticket.result()
        assert done is not None  # the watcher completes the future only once it has ended
        return done
    except asyncio.TimeoutError:
        done = ticket.result()  # ended as the timeout fell
        if done is not None:
            return done
        raise ApprovalTimeout(
            f"approval request {approval_id} is still pending after {timeout}s; it stays pending"
        ) from None
    finally:
        ticket.close()


atexit.register(_native._approvals_at_exit)


__all__ = [
    "RESOLUTIONS",
    "request",
    "resolve",
    "cancel",
    "expire_overdue",
    "expire_overdue_batches",
    "SWEEP_BATCH",
    "pending",
    "wait",
    "wait_async",
]

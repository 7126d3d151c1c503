"""The five models, drop-in replacements for cmbagent's SQLAlchemy models.

Class attributes are columns (``ApprovalRequest.status == "pending"`` is a filter);
instance attributes are values, checked against the column's type when assigned.
"""

from cmbagent_db._native import (
    ActiveConnection,
    ApprovalRequest,
    Model,
    Session,
    SessionState,
    WorkflowRun,
)

__all__ = [
    "Model",
    "Session",
    "WorkflowRun",
    "SessionState",
    "ApprovalRequest",
    "ActiveConnection",
]

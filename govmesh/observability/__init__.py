"""Observability above the bus: the public event stream, the audit index, the stored
stream, and statistics for reports.

Spans and metrics are `govmesh.telemetry`, at the bottom of the stack."""

from govmesh.observability._audit import (
    GENESIS,
    AuditCheckpoint,
    AuditConsumer,
    AuditIndex,
    AuditProblem,
    AuditRecord,
    AuditTrace,
    IngestReport,
    Problem,
    PruneMark,
    SignedCheckpoint,
    VerifyReport,
    declared_fields,
    summarize_body,
    workflow_end,
)
from govmesh.observability._events import Event, EventError, EventStart, EventStream
from govmesh.observability._stats import percentile, summarize
from govmesh.observability._stored import RefusedMessage, StoredMessage, StreamVerifier

__all__ = [
    "GENESIS",
    "AuditCheckpoint",
    "AuditConsumer",
    "AuditIndex",
    "AuditProblem",
    "AuditRecord",
    "AuditTrace",
    "Event",
    "EventError",
    "EventStart",
    "EventStream",
    "IngestReport",
    "Problem",
    "PruneMark",
    "RefusedMessage",
    "SignedCheckpoint",
    "StoredMessage",
    "StreamVerifier",
    "VerifyReport",
    "declared_fields",
    "percentile",
    "summarize",
    "summarize_body",
    "workflow_end",
]

"""Observability: telemetry export, the audit index, and statistics for reports."""

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
    summarize_body,
)
from govmesh.observability._stats import percentile, summarize
from govmesh.observability._stored import RefusedMessage, StoredMessage, StreamVerifier
from govmesh.observability._telemetry import (
    Telemetry,
    TelemetrySettings,
    configure_telemetry,
)

__all__ = [
    "GENESIS",
    "AuditCheckpoint",
    "AuditConsumer",
    "AuditIndex",
    "AuditProblem",
    "AuditRecord",
    "AuditTrace",
    "IngestReport",
    "Problem",
    "PruneMark",
    "RefusedMessage",
    "SignedCheckpoint",
    "StoredMessage",
    "StreamVerifier",
    "Telemetry",
    "TelemetrySettings",
    "VerifyReport",
    "configure_telemetry",
    "percentile",
    "summarize",
    "summarize_body",
]

"""Observability: the audit index, and statistics for reports."""

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
    "SignedCheckpoint",
    "VerifyReport",
    "percentile",
    "summarize",
    "summarize_body",
]

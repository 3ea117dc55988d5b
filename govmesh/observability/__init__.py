"""Observability: statistics for reports (tracing and the audit index come later)."""

from govmesh.observability._stats import percentile, summarize

__all__ = ["percentile", "summarize"]

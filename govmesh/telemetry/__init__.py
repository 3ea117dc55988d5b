"""Telemetry: OpenTelemetry spans and metrics, at the bottom of the stack so every layer can
record them (the audit index and `watch`, which read the bus, are `govmesh.observability`)."""

from govmesh.telemetry._telemetry import Telemetry, TelemetrySettings, configure_telemetry

__all__ = ["Telemetry", "TelemetrySettings", "configure_telemetry"]

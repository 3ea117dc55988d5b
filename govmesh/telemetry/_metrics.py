"""Metrics: tokens, cost, decisions by outcome, latencies and security rejections.

govmesh only calls the OpenTelemetry metrics API. Until the process installs a meter
provider (`configure_telemetry`, or a test's in-memory reader) every instrument here is the
API's placeholder and recording costs a method call; once one is installed, the same
instruments record into it.

Names follow the OpenTelemetry GenAI conventions where they define one (token usage, model
call and tool run durations); what is govmesh's own is under ``govmesh.*``. Durations are in
seconds, as the conventions have them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from opentelemetry import metrics
from opentelemetry.metrics import Counter, Histogram, Meter

__all__ = [
    "BUDGET_INTERRUPTS",
    "DECISIONS",
    "DECISION_DURATION",
    "HANDLER_DURATION",
    "MODEL_CALL_DURATION",
    "MODEL_COST",
    "SECURITY_REJECTIONS",
    "TOKEN_USAGE",
    "TOOL_DURATION",
    "Instruments",
    "measured",
    "record_decision",
    "record_model_usage",
]

_TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
"""The GenAI conventions' boundaries for ``gen_ai.client.token.usage``."""

_GENAI_SECONDS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
"""The GenAI conventions' boundaries for ``gen_ai.client.operation.duration``."""

_FAST_SECONDS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
"""Boundaries for govmesh's own steps, which take from a tenth of a millisecond (a policy
decision) to seconds (a handler that waits on a tool)."""


@dataclass(frozen=True)
class Instruments:
    """govmesh's instruments, made from one meter: the process's own (the module's
    constants), or a meter provider of its own, such as the one a deployment's Prometheus
    endpoint folds its event stream into.

    Attributes are named as the module's constants are, in lower case.
    """

    token_usage: Histogram
    model_call_duration: Histogram
    tool_duration: Histogram
    model_cost: Counter
    decisions: Counter
    decision_duration: Histogram
    handler_duration: Histogram
    security_rejections: Counter
    budget_interrupts: Counter

    @classmethod
    def of(cls, meter: Meter) -> Instruments:
        """The instruments, made from ``meter``."""
        return cls(
            token_usage=meter.create_histogram(
                "gen_ai.client.token.usage",
                unit="{token}",
                description="Tokens of each model call, by gen_ai.token.type (input, output).",
                explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
            ),
            model_call_duration=meter.create_histogram(
                "gen_ai.client.operation.duration",
                unit="s",
                description="How long each model call took.",
                explicit_bucket_boundaries_advisory=_GENAI_SECONDS,
            ),
            tool_duration=meter.create_histogram(
                "gen_ai.execute_tool.duration",
                unit="s",
                description="How long each tool run by the gateway took.",
                explicit_bucket_boundaries_advisory=_FAST_SECONDS,
            ),
            model_cost=meter.create_counter(
                "govmesh.model.cost",
                unit="USD",
                description="What model calls cost, at the deployment's price table.",
            ),
            decisions=meter.create_counter(
                "govmesh.decisions",
                unit="{decision}",
                description="Governance decisions, by govmesh.decision.outcome and "
                "govmesh.decision.source.",
            ),
            decision_duration=meter.create_histogram(
                "govmesh.decision.duration",
                unit="s",
                description="How long governance took to decide a tool intent by policy.",
                explicit_bucket_boundaries_advisory=_FAST_SECONDS,
            ),
            handler_duration=meter.create_histogram(
                "govmesh.handler.duration",
                unit="s",
                description="How long a bus member's handler took for one message, by "
                "message kind.",
                explicit_bucket_boundaries_advisory=_FAST_SECONDS,
            ),
            security_rejections=meter.create_counter(
                "govmesh.security.rejections",
                unit="{message}",
                description="Messages refused before any handler saw them, by "
                "govmesh.security.reason.",
            ),
            budget_interrupts=meter.create_counter(
                "govmesh.budget.interrupts",
                unit="{interrupt}",
                description="Workflows paused at their budget's soft threshold, by how a "
                "person answered.",
            ),
        )


_OWN: Final = Instruments.of(metrics.get_meter("govmesh"))
"""The process's instruments, recording into whatever meter provider it installs."""

TOKEN_USAGE: Final = _OWN.token_usage
MODEL_CALL_DURATION: Final = _OWN.model_call_duration
TOOL_DURATION: Final = _OWN.tool_duration
MODEL_COST: Final = _OWN.model_cost
DECISIONS: Final = _OWN.decisions
DECISION_DURATION: Final = _OWN.decision_duration
HANDLER_DURATION: Final = _OWN.handler_duration
SECURITY_REJECTIONS: Final = _OWN.security_rejections
BUDGET_INTERRUPTS: Final = _OWN.budget_interrupts


@contextmanager
def measured(histogram: Histogram, attributes: dict[str, str]) -> Iterator[dict[str, str]]:
    """Record how long the block takes in ``histogram``, in seconds, with ``attributes`` as
    the block leaves them (it may add some), plus ``error.type`` when it raises."""
    started = time.perf_counter()
    try:
        yield attributes
    except Exception as exc:
        attributes["error.type"] = type(exc).__qualname__
        raise
    finally:
        histogram.record(time.perf_counter() - started, attributes)


def record_decision(
    outcome: str, *, source: str, started: float | None = None, into: Instruments = _OWN
) -> None:
    """Count one governance decision.

    Args:
        outcome: ``allow``, ``deny`` or ``escalate``.
        source: ``policy`` (decided on an intent) or ``approval`` (a person's answer, or
            its expiry, settled an escalation).
        started: the `time.perf_counter` reading when deciding began, for the decision's
            duration; None records none (a person's wait is no decision latency).
        into: the instruments to record in; the process's own by default.
    """
    attributes = {"govmesh.decision.outcome": outcome}
    into.decisions.add(1, {**attributes, "govmesh.decision.source": source})
    if started is not None:
        into.decision_duration.record(time.perf_counter() - started, attributes)


def record_model_usage(
    attributes: dict[str, str],
    *,
    input_tokens: int,
    output_tokens: int,
    cost_usd: float | None,
    into: Instruments = _OWN,
) -> None:
    """Record one model call's tokens and, when it is priced, its cost.

    Args:
        attributes: the call's ``gen_ai.operation.name``, ``gen_ai.provider.name``,
            ``gen_ai.request.model`` and ``gen_ai.response.model``.
        input_tokens, output_tokens: the usage the provider reported.
        cost_usd: what the call cost; None when the agent has no price table.
        into: the instruments to record in; the process's own by default.
    """
    into.token_usage.record(input_tokens, {**attributes, "gen_ai.token.type": "input"})
    into.token_usage.record(output_tokens, {**attributes, "gen_ai.token.type": "output"})
    if cost_usd is not None:
        into.model_cost.add(cost_usd, attributes)

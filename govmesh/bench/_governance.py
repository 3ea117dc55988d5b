"""``govmesh bench governance``: how fast the policy decision point decides, in one run.

Four measurements, each with its baseline in the same process and run:

- in-process ``evaluate()`` on the seed policy and on a generated 100-policy set
  (``in_process_us``, ``in_process_100_rules_us``);
- cedarpy deciding an equivalent Cedar policy set, parsed once, on the same intents
  (``cedar_in_process_us``, ``speedup_vs_cedar``), after checking that both engines reach the
  same outcome on every benchmark intent (``cedar_disagreements``);
- the Agent Governance Toolkit's ``PolicyEvaluator`` deciding rules equivalent to the seed
  policy (``agt_in_process_us``, ``speedup_vs_agt``) and to a policy of general rules on
  arguments (``in_process_general_us`` for govmesh, ``agt_general_us``,
  ``speedup_vs_agt_general``), each after the same check (``agt_disagreements``,
  ``agt_general_disagreements``);
- intent-to-decision latency over the signed, mutual-TLS bus with one intent in flight
  (``bus_ms``);
- throughput with two governance actors sharing intents as a queue group and a window of
  intents in flight (``decisions_per_s``);
- the floor under ``bus_ms``: the same processes, connections and message sizes, with two
  stand-ins that answer each intent after one Redis round trip and do nothing else: no
  signing, verifying or deciding (``floor_ms``). What ``bus_ms`` adds to it is govmesh's;
- beneath that, what one wake-up of another process costs on this machine: a 64-byte round
  trip between two processes on one core and on two (``wake_ms``).

The bus is measured as a deployment runs it: in low-latency mode when asked for (idle CPUs
held awake and nats-server on one Go thread, see `CpuLatencyHold`; ``low_latency`` says
whether it was), else as by default; in low-latency mode the bus figures are measured again
as by default, with idle CPUs halting and nats-server on Go's default threads
(``without_low_latency``), in the same run.

In-process figures are per decision: each sample times a batch of calls over a mix of allow,
deny and escalate intents and divides, so the clock's own cost and resolution drop out.
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import os
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Final

import msgspec

from govmesh.bus import Bus, Delivery, Subjects
from govmesh.config import Deployment
from govmesh.errors import ConfigError
from govmesh.governance._actor import GovernanceService
from govmesh.governance._evaluator import EvalContext, Intent, evaluate
from govmesh.governance._policy import PolicySet, load_policies, parse_policy_text
from govmesh.governance._starts import record_start
from govmesh.governance._terms import ToolTerms
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.identity import Identity, Issuer
from govmesh.observability import summarize
from govmesh.roles import COORDINATOR_ROLE
from govmesh.runtime._latency import CpuLatencyHold, current_cpu_latency_us

__all__ = [
    "AGT_GENERAL_RULES",
    "AGT_SEED_RULES",
    "CEDAR_POLICY",
    "GENERAL_POLICY",
    "SEED_POLICY",
    "run_governance_bench",
]

SEED_POLICY: Final = Path(__file__).resolve().parents[2] / "policies" / "procurement-agent-v2.yaml"
ROLE: Final = "Procurement-Agent-v2"
TOOL: Final = "erp.create_purchase_order"
TERMS: Final = ToolTerms(name=TOOL, spend=("amount_usd",), show=("vendor", "amount_usd"))
"""The purchase order tool's terms, as governance gets them in a deployment."""
SPEND: Final = TERMS.spend

GENERAL_ROLE: Final = "Expense-Agent"
GENERAL_TOOL: Final = "ledger.pay_expense"
GENERAL_POLICY: Final = f"""\
policy:
  agent: {GENERAL_ROLE}
  allowed_tools: [{GENERAL_TOOL}]
  allowed_values:
    currency: [USD, EUR]
  denied_values:
    category: [gift_cards]
  escalate_if:
    - arg: category
      in: [travel, entertainment]
      reason: travel and entertainment need a manager
    - {{arg: amount_usd, over: 1000}}
  deny_if:
    - {{arg: memo, matches: "(?i)cash advance"}}
"""
"""A policy of general rules on arguments, none of them spend: the expense example's."""

AGT_SEED_RULES: Final[list[dict[str, Any]]] = [
    {"name": "other-roles", "priority": 100, "action": "deny",
     "condition": {"field": "role", "operator": "ne", "value": ROLE}},
    {"name": "allowed-vendors", "priority": 90, "action": "deny",
     "condition": {"field": "vendor", "operator": "not_in", "value": ["Vendor_A", "Vendor_B"]}},
    {"name": "spending-limit", "priority": 90, "action": "deny",
     "condition": {"field": "amount_usd", "operator": "gt", "value": 10000}},
    {"name": "reflection-cap", "priority": 90, "action": "deny",
     "condition": {"field": "reflections", "operator": "gt", "value": 25}},
    {"name": "approval-threshold", "priority": 50, "action": "audit",
     "condition": {"field": "amount_usd", "operator": "gt", "value": 5000}},
    {"name": "role", "priority": 10, "action": "allow",
     "condition": {"field": "role", "operator": "eq", "value": ROLE}},
]  # fmt: skip
"""The seed policy as the Agent Governance Toolkit's rules: the first match by priority
decides, denies first, then ``audit`` for escalate, then allow; anything else is denied by
the document's default."""

AGT_GENERAL_RULES: Final[list[dict[str, Any]]] = [
    {"name": "other-roles", "priority": 100, "action": "deny",
     "condition": {"field": "role", "operator": "ne", "value": GENERAL_ROLE}},
    {"name": "allowed-tools", "priority": 90, "action": "deny",
     "condition": {"field": "tool", "operator": "ne", "value": GENERAL_TOOL}},
    {"name": "allowed-currencies", "priority": 90, "action": "deny",
     "condition": {"field": "currency", "operator": "not_in", "value": ["USD", "EUR"]}},
    {"name": "denied-categories", "priority": 90, "action": "deny",
     "condition": {"field": "category", "operator": "in", "value": ["gift_cards"]}},
    {"name": "cash-advance", "priority": 90, "action": "deny",
     "condition": {"field": "memo", "operator": "matches", "value": "(?i)cash advance"}},
    {"name": "travel-and-entertainment", "priority": 50, "action": "audit",
     "condition": {"field": "category", "operator": "in", "value": ["travel", "entertainment"]}},
    {"name": "large-amounts", "priority": 50, "action": "audit",
     "condition": {"field": "amount_usd", "operator": "gt", "value": 1000}},
    {"name": "role", "priority": 10, "action": "allow",
     "condition": {"field": "role", "operator": "eq", "value": GENERAL_ROLE}},
]  # fmt: skip
"""`GENERAL_POLICY` as the Agent Governance Toolkit's rules. Its conditions do not match a
missing field, where govmesh's ``allowed_values`` denies; the benchmark's intents give every
field, so the two decide alike."""

CEDAR_POLICY: Final = """\
// policy0: allow, the seed policy's allow branch.
permit (
  principal in Role::"Procurement-Agent-v2",
  action == Action::"erp.create_purchase_order",
  resource
) when {
  ["Vendor_A", "Vendor_B"].contains(context.vendor) &&
  context.amount_usd <= 5000 && context.reflections <= 25
};
// policy1: escalate, over require_approval_if_over but within spending_limit_usd.
permit (
  principal in Role::"Procurement-Agent-v2",
  action == Action::"erp.create_purchase_order",
  resource
) when {
  ["Vendor_A", "Vendor_B"].contains(context.vendor) &&
  context.amount_usd > 5000 && context.amount_usd <= 10000 && context.reflections <= 25
};
// policy2: deny, an unlisted vendor, over the spending limit or the reflection cap.
forbid (principal, action, resource) unless {
  ["Vendor_A", "Vendor_B"].contains(context.vendor) &&
  context.amount_usd <= 10000 && context.reflections <= 25
};
"""
"""The seed policy in Cedar. Cedar has no escalate outcome: an allow determined by
``policy1`` reads as escalate, so one call gives all three outcomes."""

_CEDAR_ESCALATE: Final = "policy1"
_CEDAR_NOTE: Final = (
    "policies and entities are parsed once (cedarpy.PolicySet.from_str, "
    "Entities.from_json_str) and reused; each call still converts the request and its context "
    "from Python to Cedar, as evaluate() takes its intent as Python objects. Escalation is "
    "the allow decided by policy1."
)
_AGT_NOTE: Final = (
    "agent_os.policies.PolicyEvaluator over one PolicyDocument built once from the rules "
    "(agt_policy, agt_general_policy); each call passes the intent's fields as a context "
    "dict. It has no escalate outcome: escalate is its audit action. Its rules match the "
    "first rule by priority, so the policy is written as denies, then audits, then allow, "
    "with deny as the default."
)
_PROCESS_LAYOUT: Final = (
    "nats-server (mutual TLS; one Go thread in low-latency mode, Go's default otherwise, as "
    "the runtime embeds it) and the Redis-protocol server (Unix socket, password) are child "
    "processes; the agent "
    "sending intents runs in the benchmark's process. bus_ms, bus_loaded_ms and "
    "decisions_per_s: each governance actor in a Python process of its own, as a Ray actor "
    "hosts it. floor_ms: the same layout, connections and message sizes, with stand-ins "
    "that answer after one Redis round trip (PING) and neither sign, verify nor decide. "
    "one_process: both governance actors on the agent's event loop, so signing, verifying "
    "and deciding compete for one core"
)
_IN_PROCESS_METHOD: Final = (
    "each sample times a batch of {batch} evaluate() calls over a mix of allow, deny and "
    "escalate intents with perf_counter_ns and divides by the batch size"
)

_BATCH: Final = 100
_MIX: Final = 200
_RULES: Final = 100
_WINDOW: Final = 64
_ACTORS: Final = 2
_BUS_WARMUP: Final = 50
_BUS_TIMEOUT_S: Final = 10.0
_SPAWN: Final = multiprocessing.get_context("spawn")
"""Governance actors and stand-ins start as Ray starts actors: fresh interpreters."""
_TARGETS: Final = {
    "in_process_p50_us": 5.0,
    "bus_p99_ms": 1.0,
    "decisions_per_s": 5000.0,
    "speedup_vs_cedar": 1.0,
    "speedup_vs_agt": 1.0,
}

Progress = Callable[[str, int], None]


def _seed_mix(rng: random.Random) -> list[tuple[Intent, EvalContext]]:
    """Intents for the seed policy: every boundary once, then random ones in every region."""
    boundaries = [
        (ROLE, "Vendor_A", 0, 0),
        (ROLE, "Vendor_B", 5000, 25),
        (ROLE, "Vendor_A", 5001, 0),
        (ROLE, "Vendor_B", 10000, 0),
        (ROLE, "Vendor_A", 10001, 0),
        (ROLE, "Vendor_A", 100, 26),
        (ROLE, "Vendor_C", 100, 0),
        ("Other-Agent", "Vendor_A", 100, 0),
    ]
    cases = list(boundaries)
    while len(cases) < _MIX:
        cases.append(
            (
                ROLE if rng.random() < 0.95 else "Other-Agent",
                rng.choice(("Vendor_A", "Vendor_A", "Vendor_B", "Vendor_C")),
                rng.choice((rng.randint(1, 5000), rng.randint(5001, 10000), rng.randint(1, 15000))),
                rng.choice((0, 0, 3, 26)),
            )
        )
    return [
        (
            Intent(
                agent="proc-1" if role == ROLE else "other-1",
                role=role,
                tool=TOOL,
                args={"item": "laptops", "vendor": vendor, "amount_usd": amount},
                workflow=f"wf-{n}",
                step=1,
            ),
            EvalContext(reflections=reflections, spend_args=SPEND),
        )
        for n, (role, vendor, amount, reflections) in enumerate(cases)
    ]


def _general_mix(rng: random.Random) -> list[tuple[Intent, EvalContext]]:
    """Intents for `GENERAL_POLICY`: every rule's boundary once, then random ones."""
    fine = ("meals", "USD", 120, "team lunch")
    boundaries = [
        (GENERAL_ROLE, GENERAL_TOOL, *fine),
        (GENERAL_ROLE, GENERAL_TOOL, "meals", "EUR", 1000, "dinner"),
        (GENERAL_ROLE, GENERAL_TOOL, "meals", "EUR", 1000.5, "dinner"),
        (GENERAL_ROLE, GENERAL_TOOL, "travel", "USD", 300, "train"),
        (GENERAL_ROLE, GENERAL_TOOL, "gift_cards", "USD", 50, "thanks"),
        (GENERAL_ROLE, GENERAL_TOOL, "meals", "GBP", 50, "lunch"),
        (GENERAL_ROLE, GENERAL_TOOL, "office", "USD", 80, "a CASH Advance for supplies"),
        (GENERAL_ROLE, "ledger.refund", *fine),
        ("Other-Agent", GENERAL_TOOL, *fine),
    ]
    cases = list(boundaries)
    memos = ("team lunch", "taxi to the airport", "cash advance", "hotel, 2 nights", "printer")
    while len(cases) < _MIX:
        cases.append(
            (
                GENERAL_ROLE if rng.random() < 0.95 else "Other-Agent",
                GENERAL_TOOL if rng.random() < 0.97 else "ledger.refund",
                rng.choice(("meals", "meals", "office", "travel", "entertainment", "gift_cards")),
                rng.choice(("USD", "USD", "EUR", "GBP")),
                rng.choice((rng.randint(1, 1000), rng.randint(1, 3000))),
                rng.choice(memos),
            )
        )
    return [
        (
            Intent(
                agent="expenses-1",
                role=role,
                tool=tool,
                args={
                    "category": category,
                    "currency": currency,
                    "amount_usd": amount,
                    "memo": memo,
                },
                workflow=f"wf-{n}",
                step=1,
            ),
            EvalContext(spend_args=()),
        )
        for n, (role, tool, category, currency, amount, memo) in enumerate(cases)
    ]


def _rules_text(rules: int) -> str:
    """A policy set of ``rules`` roles, each with its own limits, vendors and cap."""
    lines = ["policies:"]
    for i in range(rules):
        limit = 1000 * (i + 1)
        lines += [
            f"  - agent: Bench-Role-{i:03d}",
            f"    spending_limit_usd: {limit}",
            f"    require_approval_if_over: {limit // 2}",
            f"    allowed_vendors: [{', '.join(f'Vendor_{i}_{k}' for k in range(5))}]",
            f"    reflection_loop_cap: {10 + i % 20}",
        ]
    return "\n".join(lines) + "\n"


def _rules_mix(rng: random.Random, rules: int) -> list[tuple[Intent, EvalContext]]:
    mix = []
    for n in range(_MIX):
        i = n % rules
        limit = 1000 * (i + 1)
        vendor = f"Vendor_{i}_{rng.randrange(5)}" if rng.random() < 0.9 else f"Vendor_{i}_9"
        mix.append(
            (
                Intent(
                    agent=f"bench-{i}",
                    role=f"Bench-Role-{i:03d}",
                    tool=TOOL,
                    args={"vendor": vendor, "amount_usd": rng.randint(1, limit + limit // 4)},
                    workflow=f"wf-{n}",
                    step=1,
                ),
                EvalContext(reflections=rng.choice((0, 5, 40))),
            )
        )
    rng.shuffle(mix)
    return mix


def _time_batches(
    decide: Callable[[Any], object],
    cases: Sequence[Any],
    *,
    decisions: int,
    tick: Progress,
) -> dict[str, float]:
    """Per-decision microseconds of ``decide`` over ``cases``, cycled in batches."""
    batches = [
        [cases[(start + k) % len(cases)] for k in range(_BATCH)]
        for start in range(0, len(cases), _BATCH)
    ]
    for case in cases:
        decide(case)
    gc.collect()
    samples: list[float] = []
    clock = time.perf_counter_ns
    for s in range(max(1, decisions // _BATCH)):
        batch = batches[s % len(batches)]
        started = clock()
        for case in batch:
            decide(case)
        samples.append((clock() - started) / _BATCH / 1000)
        tick("", _BATCH)
    return summarize(samples)


def _cedar_engine() -> tuple[Callable[[dict[str, Any]], str], str]:
    """The Cedar decision function for the seed policy, and cedarpy's version."""
    try:
        import cedarpy
    except ImportError as exc:
        raise ConfigError(
            "govmesh bench governance compares against cedarpy, which is not installed; "
            "install it with: pip install 'govmesh[bench]'"
        ) from exc
    from importlib.metadata import version

    policies = cedarpy.PolicySet.from_str(CEDAR_POLICY)
    entities = cedarpy.Entities.from_json_str(
        json.dumps(
            [
                {
                    "uid": {"type": "Agent", "id": "proc-1"},
                    "attrs": {},
                    "parents": [{"type": "Role", "id": ROLE}],
                },
                {"uid": {"type": "Role", "id": ROLE}, "attrs": {}, "parents": []},
                {
                    "uid": {"type": "Agent", "id": "other-1"},
                    "attrs": {},
                    "parents": [{"type": "Role", "id": "Other-Agent"}],
                },
                {"uid": {"type": "Role", "id": "Other-Agent"}, "attrs": {}, "parents": []},
            ]
        )
    )
    is_authorized = cedarpy.is_authorized

    def decide(request: dict[str, Any]) -> str:
        result = is_authorized(request, policies, entities)
        if not result.allowed:
            return "deny"
        return "escalate" if _CEDAR_ESCALATE in result.diagnostics.reasons else "allow"

    return decide, version("cedarpy")


def _cedar_request(intent: Intent, ctx: EvalContext) -> dict[str, Any]:
    return {
        "principal": {"type": "Agent", "id": intent.agent},
        "action": {"type": "Action", "id": intent.tool},
        "resource": {"type": "Tool", "id": intent.tool},
        "context": {
            "vendor": intent.args["vendor"],
            "amount_usd": intent.args["amount_usd"],
            "reflections": ctx.reflections,
        },
    }


def _agt_engine(
    name: str, rules: list[dict[str, Any]]
) -> tuple[Callable[[dict[str, Any]], str], str]:
    """The Agent Governance Toolkit's decision function for ``rules``, and its version."""
    import warnings

    try:
        with warnings.catch_warnings():
            # agent_os warns about its old distribution's name, not about this use of it.
            warnings.simplefilter("ignore", DeprecationWarning)
            from agent_os.policies import PolicyDocument, PolicyEvaluator
    except ImportError as exc:
        raise ConfigError(
            "govmesh bench governance compares against the Agent Governance Toolkit, which "
            "is not installed; install it with: pip install 'govmesh[bench]'"
        ) from exc
    from importlib.metadata import version

    document = PolicyDocument.model_validate(
        {"name": name, "rules": rules, "defaults": {"action": "deny"}}
    )
    evaluate_agt = PolicyEvaluator(policies=[document]).evaluate

    def decide(context: dict[str, Any]) -> str:
        action: str = evaluate_agt(context).action
        return "escalate" if action == "audit" else action

    return decide, version("agent-governance-toolkit-core")


def _agt_context(intent: Intent, ctx: EvalContext) -> dict[str, Any]:
    return {"role": intent.role, "tool": intent.tool, "reflections": ctx.reflections, **intent.args}


def _in_process(decisions: int, tick: Progress) -> dict[str, Any]:
    rng = random.Random(7)
    seed = load_policies([SEED_POLICY])
    rules = parse_policy_text(_rules_text(_RULES), source="<bench: 100 rules>")
    general = parse_policy_text(GENERAL_POLICY, source="<bench: general rules>")
    seed_mix, rules_mix = _seed_mix(rng), _rules_mix(rng, _RULES)
    general_mix = _general_mix(rng)
    cedar, cedar_version = _cedar_engine()
    requests = [_cedar_request(intent, ctx) for intent, ctx in seed_mix]
    agt_seed, agt_version = _agt_engine("seed", AGT_SEED_RULES)
    agt_general, _ = _agt_engine("general", AGT_GENERAL_RULES)
    seed_contexts = [_agt_context(intent, ctx) for intent, ctx in seed_mix]
    general_contexts = [_agt_context(intent, ctx) for intent, ctx in general_mix]

    ours = [evaluate(seed, intent, ctx).outcome for intent, ctx in seed_mix]
    theirs = [cedar(request) for request in requests]
    disagreements = sum(a != b for a, b in zip(ours, theirs, strict=True))
    agt_ours = [agt_seed(context) for context in seed_contexts]
    general_ours = [evaluate(general, intent, ctx).outcome for intent, ctx in general_mix]
    general_agt = [agt_general(context) for context in general_contexts]

    def on(policies: PolicySet) -> Callable[[Any], object]:
        def decide(case: tuple[Intent, EvalContext]) -> object:
            return evaluate(policies, case[0], case[1])

        return decide

    tick("in-process: seed policy", 0)
    seed_us = _time_batches(on(seed), seed_mix, decisions=decisions, tick=tick)
    tick(f"in-process: {_RULES} policies", 0)
    rules_us = _time_batches(on(rules), rules_mix, decisions=decisions, tick=tick)
    tick("in-process: cedarpy", 0)
    cedar_us = _time_batches(cedar, requests, decisions=decisions, tick=tick)
    tick("in-process: Agent Governance Toolkit, seed policy", 0)
    agt_us = _time_batches(agt_seed, seed_contexts, decisions=decisions, tick=tick)
    tick("in-process: general rules", 0)
    general_us = _time_batches(on(general), general_mix, decisions=decisions, tick=tick)
    tick("in-process: Agent Governance Toolkit, general rules", 0)
    agt_general_us = _time_batches(agt_general, general_contexts, decisions=decisions, tick=tick)
    return {
        "in_process_us": seed_us,
        "in_process_100_rules_us": rules_us,
        "in_process_method": _IN_PROCESS_METHOD.format(batch=_BATCH),
        "in_process_general_us": general_us,
        "in_process_outcomes": {
            "seed": dict(Counter(ours)),
            "general": dict(Counter(general_ours)),
            "100_rules": dict(
                Counter(evaluate(rules, intent, ctx).outcome for intent, ctx in rules_mix)
            ),
        },
        "cedar_in_process_us": cedar_us,
        "speedup_vs_cedar": cedar_us["p50"] / seed_us["p50"],
        "cedar_version": cedar_version,
        "cedar_preparsed": True,
        "cedar_note": _CEDAR_NOTE,
        "cedar_policy": CEDAR_POLICY,
        "cedar_compared": len(ours),
        "cedar_disagreements": disagreements,
        "agt_in_process_us": agt_us,
        "speedup_vs_agt": agt_us["p50"] / seed_us["p50"],
        "agt_general_us": agt_general_us,
        "speedup_vs_agt_general": agt_general_us["p50"] / general_us["p50"],
        "agt_version": agt_version,
        "agt_note": _AGT_NOTE,
        "agt_policy": AGT_SEED_RULES,
        "agt_general_policy": AGT_GENERAL_RULES,
        "general_policy": GENERAL_POLICY,
        "agt_compared": len(agt_ours),
        "agt_disagreements": sum(a != b for a, b in zip(ours, agt_ours, strict=True)),
        "agt_general_compared": len(general_agt),
        "agt_general_disagreements": sum(
            a != b for a, b in zip(general_ours, general_agt, strict=True)
        ),
    }


class _Decisions:
    """Matches decisions to the intents they answer, by the intent's envelope id.

    A waiter is registered before its intent is published, so no decision can come first;
    one watchdog fails the waiters older than `_BUS_TIMEOUT_S`, rather than a timer per
    intent, which would be measured too.
    """

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.sizes: Counter[int] = Counter()
        """Decisions by their size on the wire."""
        self._waiting: dict[str, tuple[float, asyncio.Future[float]]] = {}

    async def on_decision(self, d: Delivery) -> None:
        received = time.perf_counter()
        body: Decision = d.body
        self.outcomes[body.outcome] += 1
        self.sizes[len(d.data)] += 1
        entry = self._waiting.pop(body.intent_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(received)

    def expect(self, intent_id: str) -> asyncio.Future[float]:
        """A future for when the decision on ``intent_id`` arrives (``perf_counter`` s)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[intent_id] = (time.perf_counter(), waiter)
        return waiter

    async def watchdog(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            late = time.perf_counter() - _BUS_TIMEOUT_S
            for intent_id, (since, waiter) in list(self._waiting.items()):
                if since < late:
                    del self._waiting[intent_id]
                    waiter.set_exception(
                        TimeoutError(f"no decision on intent {intent_id} in {_BUS_TIMEOUT_S} s")
                    )


def _bus_args(n: int) -> dict[str, Any]:
    # Every 50th intent escalates (a Redis write and an approval request); the rest allow.
    amount = 7500 if n % 50 == 49 else 100 + (n * 37) % 4900
    return {"item": "laptops", "vendor": "Vendor_A", "amount_usd": amount}


def _serve_governance(
    deployment: Deployment, identity: Identity, results: Any, ready: Any, stop: Any
) -> None:
    """A governance actor in a process of its own, as a Ray actor hosts it, until ``stop``;
    puts its decision counts in ``results``. Runs in a child process."""
    import uvloop

    async def serve() -> None:
        service = GovernanceService(
            deployment, identity, policy_paths=[str(SEED_POLICY)], tools=[TERMS]
        )
        await service.start()
        ready.set()
        try:
            await _stopped(stop)
        finally:
            results.put((identity.agent_id, sum(service.decided.values())))
            await service.close()

    uvloop.run(serve())


async def _stopped(stop: Any) -> None:
    # A thread waits for the event, so the process wakes for nothing else than its work.
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)


def _serve_floor(
    deployment: Deployment, identity: Identity, answer_bytes: int, ready: Any, stop: Any
) -> None:
    """A stand-in for a governance actor, in a process of its own, until ``stop``: it answers
    each intent with ``answer_bytes`` bytes after one Redis round trip (a PING), over the same
    mutual-TLS connection a governance actor has, and does nothing else. Runs in a child
    process."""
    import uvloop

    from govmesh.runtime._resp import RespConnection

    async def serve() -> None:
        bus = await Bus.connect(deployment, identity, rotate=False)
        redis = RespConnection(deployment.redis_url)
        answer = bytes(answer_bytes)
        try:
            await redis.call("PING")

            async def on_intent(msg: Any) -> None:
                await redis.call("PING")
                await bus.nc.publish(msg.reply, answer)

            await bus.nc.subscribe(bus.subjects.all("intent"), queue="floor", cb=on_intent)
            await bus.flush()
            ready.set()
            await _stopped(stop)
        finally:
            await redis.close()
            await bus.close()

    uvloop.run(serve())


async def _one_in_flight(
    round_trip: Callable[[int], Awaitable[float]],
    *,
    first: int,
    count: int,
    tick: Progress,
    phase: str,
) -> list[float]:
    """`_BUS_WARMUP` untimed round trips (numbered below ``first``), then ``count`` timed
    ones numbered from ``first``, one at a time; returns their milliseconds."""
    for n in range(_BUS_WARMUP):
        await round_trip(first - 1 - n)
    tick(phase, 0)
    times: list[float] = []
    for n in range(first, first + count):
        times.append(await round_trip(n))
        tick("", 1)
    return times


async def _floor(agent: Bus, *, intents: int, tick: Progress) -> dict[str, Any]:
    """One sealed intent in flight at a time, answered by the `_serve_floor` stand-ins on an
    inbox of the agent's, timed as `_phase` times a decision."""
    subject = agent.subjects.intent(agent.identity.agent_id)
    _, data = agent.codec.seal(
        agent.identity,
        subject=subject,
        body=ToolIntent(tool=TOOL, args=_bus_args(0), step=1),
        workflow="wf-floor",
    )
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[float] = loop.create_future()

    async def on_answer(_msg: Any) -> None:
        if not waiter.done():
            waiter.set_result(time.perf_counter())

    inbox = agent.nc.new_inbox()
    answers = await agent.nc.subscribe(inbox, cb=on_answer)
    await agent.flush()

    async def answered(_n: int) -> float:
        nonlocal waiter
        waiter = loop.create_future()
        started = time.perf_counter()
        await agent.nc.publish(subject, data, reply=inbox)
        return (await waiter - started) * 1000

    # One deadline for the phase, not a timer per intent, which would be measured too.
    try:
        async with asyncio.timeout(_BUS_TIMEOUT_S + intents * _BUS_TIMEOUT_S / 100):
            floor = await _one_in_flight(
                answered,
                first=0,
                count=intents,
                tick=tick,
                phase="bus floor: no signing, verifying or deciding",
            )
    finally:
        await answers.unsubscribe()
    return summarize(floor)


_WAKES: Final = 2000


def _echo_peer(port: int, cpu: int) -> None:
    """The other end of `_wake_probe`, on core ``cpu``: echoes until the socket closes."""
    import socket

    os.sched_setaffinity(0, {cpu})
    with socket.create_connection(("127.0.0.1", port)) as peer:
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := peer.recv(65536):
            peer.sendall(data)


def _wake_probe(tick: Progress) -> dict[str, Any]:
    """Round trips of 64 bytes to a process on this one's core, then on another: what one
    wake-up of another process costs here, with no NATS, Redis or Python work between.

    This process is held on core 0 while it measures (and let go after); on a machine with
    one core, or without core affinity, there is nothing to compare and the report says so.
    """
    import socket

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        return {"skipped": "needs two cores and core affinity"}
    cores = sorted(os.sched_getaffinity(0))
    tick("machine: wake-ups on one core and across two", 0)
    result: dict[str, Any] = {"round_trips": _WAKES, "bytes": 64}
    try:
        os.sched_setaffinity(0, {cores[0]})
        for name, cpu in (("same_core", cores[0]), ("cross_core", cores[1])):
            with socket.create_server(("127.0.0.1", 0)) as server:
                peer = _SPAWN.Process(
                    target=_echo_peer, args=(server.getsockname()[1], cpu), daemon=True
                )
                peer.start()
                server.settimeout(60.0)
                conn, _ = server.accept()
                with conn:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    ping, times = bytes(64), []
                    for n in range(_BUS_WARMUP + _WAKES):
                        started = time.perf_counter()
                        conn.sendall(ping)
                        got = 0
                        while got < len(ping):
                            got += len(conn.recv(65536))
                        if n >= _BUS_WARMUP:
                            times.append((time.perf_counter() - started) * 1000)
                peer.join(15)
                if peer.is_alive():
                    peer.kill()
            result[name] = summarize(times)
    finally:
        os.sched_setaffinity(0, set(cores))
    return result


async def _phase(
    deployment: Deployment,
    agent: Bus,
    coordinator: Bus,
    decisions: _Decisions,
    *,
    intents: int,
    first: int,
    tick: Progress,
    label: str,
) -> dict[str, Any]:
    """One intent in flight, then `_WINDOW` in flight, against the governance actors that
    serve ``deployment`` now. Each intent is in a workflow of its own, whose start the
    coordinator records before the timing begins."""
    subjects = agent.subjects
    intent_subject = subjects.intent(agent.identity.agent_id)
    run = uuid.uuid4().hex[:8]
    tick(f"bus ({label}): recording the workflows' starts", 0)
    await _start_all(
        coordinator,
        [f"wf-{run}-{n}" for n in range(first - _BUS_WARMUP, first + 2 * intents)],
        agent.identity.agent_id,
    )

    async def decide(n: int) -> float:
        started = time.perf_counter()
        envelope, data = agent.codec.seal(
            agent.identity,
            subject=intent_subject,
            body=ToolIntent(tool=TOOL, args=_bus_args(n), step=1),
            workflow=f"wf-{run}-{n}",
        )
        arrived = decisions.expect(envelope.id)
        await agent.nc.publish(intent_subject, data)
        return (await arrived - started) * 1000

    quiet = await _one_in_flight(
        decide, first=first, count=intents, tick=tick, phase=f"bus ({label}): one intent in flight"
    )
    tick(f"bus ({label}): {_WINDOW} in flight, {_ACTORS} actors", 0)
    loaded: list[float] = []
    queued = iter(range(first + intents, first + 2 * intents))

    async def worker() -> None:
        for n in queued:
            loaded.append(await decide(n))
            tick("", 1)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(_WINDOW)))
    elapsed = time.perf_counter() - started
    busy = summarize(loaded)
    return {
        "bus_ms": summarize(quiet),
        "bus_loaded_ms": {"p50": busy["p50"], "p99": busy["p99"]},
        "decisions_per_s": len(loaded) / elapsed,
    }


async def _start_all(coordinator: Bus, workflows: list[str], agent: str) -> None:
    """Record the start of ``workflows``, `_WINDOW` at a time, each naming ``agent``."""
    pending = iter(workflows)

    async def worker() -> None:
        for workflow in pending:
            await record_start(coordinator, workflow, (agent,))

    await asyncio.gather(*(worker() for _ in range(_WINDOW)))


@asynccontextmanager
async def _processes(
    target: Callable[..., None], each: Sequence[tuple[Any, ...]], what: str
) -> AsyncIterator[None]:
    """One process running ``target(*args, ready, stop)`` per ``args`` in ``each``, ready
    when this enters, told to stop when it leaves (and killed if it does not)."""
    stop = _SPAWN.Event()
    started = []
    try:
        for args in each:
            ready = _SPAWN.Event()
            process = _SPAWN.Process(target=target, args=(*args, ready, stop), daemon=True)
            process.start()
            started.append((process, ready))
        loop = asyncio.get_running_loop()
        for process, ready in started:
            if not await loop.run_in_executor(None, ready.wait, 60.0):
                raise ConfigError(f"a {what} process did not start ({process.name})")
        yield
    finally:
        stop.set()
        for process, _ in started:
            process.join(15)
            if process.is_alive():
                process.kill()


async def _on_bus(intents: int, tick: Progress, *, go_threads: int | None) -> dict[str, Any]:
    from govmesh.runtime import RedisServer, Transport

    subjects = Subjects("bench")
    issuer = Issuer(name="bench", audience="govmesh:bench")
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="govmesh-bench-") as tmp:
        async with AsyncExitStack() as stack:
            transport, nats_server = Transport.embedded(Path(tmp) / "nats", jetstream=False)
            nats_server.go_threads = go_threads
            stack.enter_context(nats_server)
            redis_server = stack.enter_context(RedisServer(workdir=Path(tmp) / "redis"))
            actors = [issuer.identity(f"governance-{i}", "governance") for i in range(_ACTORS)]
            # A day's budget authority that no run of the bench reaches.
            agent_id = issuer.identity("proc-1", ROLE, capabilities=(TOOL,), budget_usd=1e12)
            coordinator_id = issuer.identity("coordinator-1", COORDINATOR_ROLE)
            transport.enrol([*actors, agent_id, coordinator_id], tenant=subjects.tenant)
            deployment = issuer.deployment(
                tenant=subjects.tenant,
                nats_url=nats_server.url,
                redis_url=redis_server.url,
                tls=True,
            )
            agent = await Bus.connect(deployment, agent_id, rotate=False)
            stack.push_async_callback(agent.close)
            coordinator = await Bus.connect(deployment, coordinator_id, rotate=False)
            stack.push_async_callback(coordinator.close)
            decisions = _Decisions()
            await agent.subscribe(
                subjects.decisions(agent_id.agent_id),
                decisions.on_decision,
                accepts=Decision,
                concurrent=False,
            )
            await agent.flush()
            watchdog = asyncio.create_task(decisions.watchdog())
            stack.callback(watchdog.cancel)

            # Layout 1: the governance actors on this process's event loop, beside the agent.
            services = []
            async with AsyncExitStack() as hosted:
                for identity in actors:
                    service = GovernanceService(
                        deployment, identity, policy_paths=[str(SEED_POLICY)], tools=[TERMS]
                    )
                    hosted.push_async_callback(service.close)
                    await service.start()
                    services.append(service)
                one = await _phase(
                    deployment,
                    agent,
                    coordinator,
                    decisions,
                    intents=intents,
                    first=0,
                    tick=tick,
                    label="one process",
                )
                one["decisions_per_actor"] = [sum(s.decided.values()) for s in services]
            # Layout 2: each governance actor in a process of its own, as deployed.
            results = _SPAWN.Queue()
            async with _processes(
                _serve_governance, [(deployment, a, results) for a in actors], "governance"
            ):
                apart = await _phase(
                    deployment,
                    agent,
                    coordinator,
                    decisions,
                    intents=intents,
                    first=10 * intents,
                    tick=tick,
                    label="actor processes",
                )
            counts = {}
            while not results.empty():
                member, count = results.get()
                counts[member] = count
            apart["decisions_per_actor"] = [counts.get(a.agent_id, 0) for a in actors]
            # The floor: the same layout with stand-ins that do none of govmesh's work.
            answer_bytes = max(decisions.sizes, key=decisions.sizes.__getitem__)
            async with _processes(
                _serve_floor, [(deployment, a, answer_bytes) for a in actors], "floor"
            ):
                apart["floor_ms"] = await _floor(agent, intents=intents, tick=tick)
    report.update(apart)
    report["bus_over_floor_ms"] = {
        q: report["bus_ms"][q] - report["floor_ms"][q] for q in ("p50", "p99")
    }
    report["one_process"] = one
    report["bus_intents"] = 4 * intents
    report["floor_intents"] = intents
    report["bus_warmup"] = 2 * _BUS_WARMUP
    report["bus_outcomes"] = dict(decisions.outcomes)
    return report


_COMPARED: Final = ("bus_ms", "bus_loaded_ms", "decisions_per_s", "floor_ms", "bus_over_floor_ms")
"""What ``without_low_latency`` repeats of the report."""


def _latency_in_force() -> dict[str, Any]:
    """The CPU latency bound this machine is under now, from any process's request."""
    try:
        return {"cpu_latency_us_in_force": current_cpu_latency_us()}
    except OSError as exc:
        return {"cpu_latency_us_in_force": None, "cpu_latency_unreadable": str(exc)}


async def run_governance_bench(
    *,
    decisions: int = 100_000,
    intents: int = 2000,
    low_latency: str | None = None,
    tick: Progress | None = None,
) -> dict[str, Any]:
    """Measure governance in process, against cedarpy and the Agent Governance Toolkit, and
    over the bus; return the report.

    The bus is measured as a deployment runs it: with this machine's CPUs held awake and
    nats-server on one Go thread when `low_latency` is ``on`` (see `CpuLatencyHold`), and
    then again as by default, in the same run (``without_low_latency``).

    Args:
        decisions: timed decisions per in-process engine (seed, 100 policies, cedarpy, the
            Agent Governance Toolkit on the seed, general rules, the Toolkit on those),
            rounded down to whole batches of 100 (at least one).
        intents: intents over the bus in each phase (latency, then throughput).
        low_latency: ``on`` or ``off``; default ``$GOVMESH_LOW_LATENCY``, else ``off``.
        tick: progress callback ``(phase name or "", completed decisions or intents)``;
            the bus phases come to ``10 * intents``, whether or not they run twice.

    Raises:
        ConfigError: `low_latency` is not a mode, or is ``on`` and cannot be held.
    """
    progress = tick or (lambda _s, _n: None)
    hold = CpuLatencyHold(low_latency)
    # A mode of `on` that cannot be held fails now, not after the in-process phase; the
    # in-process phase runs without it, as one process on its own needs no wake-ups.
    hold.acquire()
    hold.release()
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    report: dict[str, Any] = {
        "decisions": max(1, decisions // _BATCH) * _BATCH,
        "intents": intents,
        "window": _WINDOW,
        "governance_actors": _ACTORS,
        "event_loop": loop,
        "process_layout": _PROCESS_LAYOUT,
    }
    report.update(_in_process(decisions, progress))
    with hold as state:
        report["low_latency"] = {**msgspec.structs.asdict(state), **_latency_in_force()}
        report["wake_ms"] = _wake_probe(progress)
        report.update(await _on_bus(intents, progress, go_threads=1 if state.held else None))
    if state.held:
        halting: dict[str, Any] = {**_latency_in_force()}
        halting["wake_ms"] = _wake_probe(progress)
        bus = await _on_bus(intents, progress, go_threads=None)
        halting.update({key: bus[key] for key in _COMPARED})
        halting["one_process_bus_ms"] = bus["one_process"]["bus_ms"]
        report["without_low_latency"] = halting
    else:
        progress("", 5 * intents)
    report["targets"] = _TARGETS
    report["met"] = {
        "in_process_p50_us": report["in_process_us"]["p50"] <= _TARGETS["in_process_p50_us"],
        "bus_p99_ms": report["bus_ms"]["p99"] <= _TARGETS["bus_p99_ms"],
        "decisions_per_s": report["decisions_per_s"] >= _TARGETS["decisions_per_s"],
        "speedup_vs_cedar": report["speedup_vs_cedar"] > _TARGETS["speedup_vs_cedar"],
        "speedup_vs_agt": report["speedup_vs_agt"] > _TARGETS["speedup_vs_agt"],
    }
    return report

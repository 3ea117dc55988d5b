"""The tool gateway: the policy enforcement point. No tool runs without a valid decision, and
no step's tool call takes effect twice."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import msgspec
from redis.exceptions import RedisError

from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.errors import ConfigError, SecurityError, ToolArgumentError, ToolError
from govmesh.governance._evaluator import Intent, intent_hash
from govmesh.governance.messages import Decision
from govmesh.identity import Claims, Identity
from govmesh.roles import GOVERNANCE_ROLE
from govmesh.service import Service, being_cancelled, raise_if_cancelled
from govmesh.telemetry._metrics import TOOL_DURATION, measured
from govmesh.telemetry._tracing import span
from govmesh.tools._ledger import LEASE_S, Entry, Ledger
from govmesh.tools._registry import ToolContext
from govmesh.tools._spec import ToolSpec, load_tools
from govmesh.tools.messages import ToolCall, ToolResult

__all__ = ["STEP_IN_PROGRESS", "GatewayService"]

log = logging.getLogger(__name__)

QUEUE = "gateway"
STEP_IN_PROGRESS = "step in progress"
_MAX_ERROR = 500
"""Characters of an unexpected exception's message that an agent is told."""
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*):[^\s/@]*@")


def _authorize_call(claims: Claims, call: ToolCall) -> None:
    claims.require(call.tool)


class GatewayService(Service):
    """Runs a tool call only when it carries a governance decision that is signed, ``allow``,
    for this workflow and agent, and bound to the hash of exactly this call; and runs each
    step's call to effect at most once.

    Agents hold no tool credentials: tools run here, in the gateway's process, each with a
    `ToolContext` that lends it this gateway's Redis connection. A call's arguments are
    converted to the tool's argument type before it runs, and its result to JSON-able
    builtins. Every refusal is a security event.

    Every answer (a result, a failure, a refusal) goes to the caller's reply inbox and is
    also recorded on ``result.<agent>`` (`Subjects.result`), signed by this gateway and
    caused by the call, so the event stream and the audit index hold it.

    Each call goes through the idempotency ledger (`Ledger`, whose module documents the
    states and every crash window) before anything runs. The first call for a (workflow,
    step, intent hash) claims the step atomically, which also uses its decision, so several
    gateways in the queue group never both run it; the tool gets the step's idempotency key
    in `ToolContext.idempotency_key`, and the answer is recorded before the reply. The one
    window the ledger cannot close by itself is a crash after the tool took effect and before
    its answer was recorded: the ledger cannot tell it from a crash before the tool ran, so
    only a tool that dedupes on the key may run again. A retried call for the same step (the
    agent crashed, the reply was lost, a gateway crashed) then:

    - gets the recorded answer, marked ``replayed``, when the step is done;
    - runs the tool again with the same key when its last attempt failed and may be retried;
    - gets ``"step in progress"`` while another attempt holds the step's lease;
    - re-runs an idempotent tool with the same key when the gateway that held the lease
      stopped renewing it before recording an answer;
    - gets ``"in doubt: ..."`` in that case for a tool that is not idempotent, which is never
      run again; the first gateway to find it reports an ``in_doubt`` security event and
      counts it in `in_doubt`, so a person resolves it.

    The decision a retry presents must still be genuine, ``allow`` and bound to the same
    intent; it may be the one already used, since the ledger entry is the proof that it
    authorised this step. It must be unexpired only when the tool is to run: an expired
    decision still gets a recorded answer back, so an agent that comes back after the
    decision's lifetime learns what its step did.

    A tool that raises answers the agent at once, and the failure is counted in `failed`:

    - ``ToolError`` carries its message and whether it may be retried; a retryable failure
      gives the step back (`Ledger.release`), any other is recorded as the step's answer;
    - ``ValueError`` or ``TypeError`` means the tool refused bad arguments: recorded; so are
      arguments that do not fit the tool's argument type (`ToolArgumentError`, naming the
      field path and quoting the value), which the tool never sees;
    - any other exception is a failure that is not retried, recorded and answered with its
      type and message; the traceback goes to this gateway's log.

    What a failure says is masked, in the answer and the log: passwords in URLs, and the
    deployment's Redis password.

    Args:
        deployment: where the services are and whom to trust.
        identity: this gateway's identity.
        tools: the tools it runs: `ToolSpec` s, or paths ``"pkg.module:name"`` of ones,
            imported here (in the gateway's own process when it is an actor).
        search_path: folders put on ``sys.path`` before the paths are imported.
        lease_s: how long a claim on a step lasts without renewal; the gateway renews it
            every third of that while the tool runs, so a step is re-run (or put in doubt)
            only once its gateway has been silent this long.

    Raises:
        ConfigError: ``lease_s`` is not a positive number of seconds, or a tool does not load
            (see `load_tools`).
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        tools: Sequence[str | ToolSpec[Any, Any]] = (),
        search_path: Sequence[str] = (),
        lease_s: float = LEASE_S,
    ) -> None:
        if isinstance(lease_s, bool) or not isinstance(lease_s, int | float):
            raise ConfigError(f"lease_s must be a number of seconds, got {lease_s!r}")
        if not 0 < lease_s < math.inf:
            raise ConfigError(f"lease_s must be positive and finite, got {lease_s!r}")
        super().__init__(deployment, identity)
        self.lease_s = float(lease_s)
        self.tools = load_tools(tools, search_path=search_path)
        self.ran: Counter[str] = Counter()
        self.replayed: Counter[str] = Counter()
        self.in_progress: Counter[str] = Counter()
        self.in_doubt: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self._ledger: Ledger | None = None

    @property
    def ledger(self) -> Ledger:
        """The idempotency ledger; available after `start`."""
        if self._ledger is None:
            raise RuntimeError(f"{self.identity.agent_id} is not started")
        return self._ledger

    async def on_start(self) -> None:
        """Subscribe to tool calls."""
        self._ledger = Ledger(self.redis, tenant=self.deployment.tenant)
        await self.bus.subscribe(
            self.subjects.all("tool"),
            self._on_call,
            accepts=ToolCall,
            queue=QUEUE,
            authorize=_authorize_call,
        )

    def stats(self) -> dict[str, Any]:
        """Counters, plus tool runs, failed tool runs, replayed answers, calls refused as in
        progress, and steps put in doubt, each by tool."""
        return {
            **super().stats(),
            "ran": dict(self.ran),
            "failed": dict(self.failed),
            "replayed": dict(self.replayed),
            "in_progress": dict(self.in_progress),
            "in_doubt": dict(self.in_doubt),
        }

    async def _on_call(self, d: Delivery) -> None:
        call: ToolCall = d.body
        try:
            decision_id, decision, digest = self._verify(d, call)
        except SecurityError as exc:
            await self._refuse(d, exc)
            return
        tool = self.tools.get(call.tool)
        if tool is None:
            await self._answer(d, ToolResult(ok=False, error=f"no tool {call.tool!r}"))
            return
        workflow, now = d.envelope.workflow, time.time()
        entry = Entry(
            state="running",
            workflow=workflow,
            step=call.step,
            intent_hash=digest,
            tool=call.tool,
            idempotency_key=self.ledger.idempotency_key(workflow, call.step, digest),
            decision_id=decision_id,
            gateway=self.identity.agent_id,
            call=d.envelope.id,
            started_at=now,
            lease_until=now + self.lease_s,
        )
        found = await self.ledger.begin(
            entry, idempotent=tool.idempotent, may_run=decision.expires_at > now
        )
        match found:
            case ToolResult():
                self.replayed[call.tool] += 1
                answer = msgspec.structs.replace(found, replayed=True)
            case "new" | "resumed" | "retried":
                ctx = ToolContext(
                    workflow=workflow,
                    agent=d.claims.sub,
                    step=call.step,
                    decision_id=decision_id,
                    approval_id=decision.approval_id,
                    approved_by=decision.approved_by,
                    idempotency_key=entry.idempotency_key,
                    key_prefix=self.deployment.key_prefix,
                    redis=self.redis,
                )
                answer = await self._run(tool, call, ctx, entry)
            case "running":
                self.in_progress[call.tool] += 1
                answer = ToolResult(ok=False, error=STEP_IN_PROGRESS)
            case "doubted" | "in_doubt":
                answer = await self._doubt(d, entry, first=found == "doubted")
            case "expired":
                expired = f"expired at {decision.expires_at}"
                await self._refuse(d, SecurityError("decision_expired", expired))
                return
            case "reused":
                used = f"decision {decision_id} already used"
                await self._refuse(d, SecurityError("decision_reused", used))
                return
        await self._answer(d, answer)

    async def _answer(self, d: Delivery, answer: ToolResult) -> None:
        """Record ``answer`` where the event stream keeps it, then reply with it."""
        await self.bus.publish(
            self.subjects.result(d.claims.sub),
            answer,
            workflow=d.envelope.workflow,
            causation=d.envelope.id,
            trace=d.envelope.trace,
        )
        await self.bus.respond(d, answer)

    async def _refuse(self, d: Delivery, exc: SecurityError) -> None:
        self.bus.report(exc, subject=d.envelope.subject, data=d.data)
        await self._answer(d, ToolResult(ok=False, error=f"refused: {exc}"))

    async def _run(
        self, tool: ToolSpec[Any, Any], call: ToolCall, ctx: ToolContext, entry: Entry
    ) -> ToolResult:
        key = self.ledger.key(entry.workflow, entry.step, entry.intent_hash)
        keeper = asyncio.get_running_loop().create_task(
            self._keep_lease(key, entry.call), name=f"lease-{entry.call}"
        )
        try:
            tool_attributes = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": call.tool,
            }
            with (
                span(
                    f"execute_tool {call.tool}",
                    attributes={
                        **tool_attributes,
                        "gen_ai.tool.call.id": entry.call,
                        "govmesh.workflow": entry.workflow,
                        "govmesh.step": entry.step,
                        "govmesh.decision.id": entry.decision_id,
                        "govmesh.idempotency_key": entry.idempotency_key,
                    },
                ) as run,
                measured(TOOL_DURATION, tool_attributes) as timing,
            ):
                try:
                    ran = await tool(tool.load_args(call.args), ctx)
                    result = ToolResult(ok=True, result=tool.dump_result(ran))
                except Exception as exc:
                    result = self._failure(call, entry, exc)
                    timing["error.type"] = type(exc).__qualname__
                    run.set_attribute("error.type", type(exc).__qualname__)
                run.set_attribute("govmesh.tool.ok", result.ok)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        (self.ran if result.ok else self.failed)[call.tool] += 1
        if result.retryable:
            recorded = await self.ledger.release(key, result, call=entry.call, now=time.time())
        else:
            recorded = await self.ledger.finish(key, result, now=time.time())
        if recorded is None:
            log.warning("the ledger entry %s was removed while %s ran", key, call.tool)
            return result
        # Another attempt may have recorded first (after this one lost its lease); every
        # caller gets the same answer.
        return recorded

    def _failure(self, call: ToolCall, entry: Entry, exc: Exception) -> ToolResult:
        """The answer to a call whose tool raised ``exc``; what it says is masked."""
        match exc:
            case ToolError():
                error = exc.message
            case ToolArgumentError():
                error = exc.problem
            case ValueError() | TypeError():
                error = str(exc)
            case _:
                # Not the tool's own verdict: a bug or an outage it did not expect. The
                # traceback stays here; the agent learns what went wrong.
                text = self._mask("".join(traceback.format_exception(exc)))
                log.error(
                    "%s failed at step %s of %r:\n%s", call.tool, entry.step, entry.workflow, text
                )
                error = f"{type(exc).__qualname__}: {self._mask(str(exc))[:_MAX_ERROR]}"
        retryable = isinstance(exc, ToolError) and exc.retryable
        return ToolResult(ok=False, error=self._mask(f"{call.tool}: {error}"), retryable=retryable)

    def _mask(self, text: str) -> str:
        """``text`` with the passwords of URLs, and the deployment's Redis password, masked."""
        text = _URL_PASSWORD.sub(r"\g<head>:***@", text)
        password = urlsplit(self.deployment.redis_url).password
        return text.replace(password, "***") if password else text

    async def _keep_lease(self, key: str, call: str) -> None:
        """Renew the lease on ``key`` until cancelled (when the tool returns)."""
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self.lease_s / 3)
            try:
                until = time.time() + self.lease_s
                held = await self.ledger.renew(key, call=call, lease_until=until)
            except RedisError as exc:
                if being_cancelled():
                    raise
                log.warning("could not renew the lease on %s: %s", key, exc)
                continue
            if not held:
                log.warning("lost the lease on %s to another attempt", key)
                return

    async def _doubt(self, d: Delivery, entry: Entry, *, first: bool) -> ToolResult:
        key = self.ledger.key(entry.workflow, entry.step, entry.intent_hash)
        found = await self.ledger.entry(key)
        started = f"{found.gateway} at {found.started_at:.3f}" if found else "a gateway"
        error = (
            f"in doubt: {entry.tool} at step {entry.step} of {entry.workflow!r} was started by "
            f"{started} and never recorded an answer; it is not idempotent, so it is not run "
            f"again until a person checks idempotency key {entry.idempotency_key!r} and "
            f"resolves ledger entry {key!r}"
        )
        if first:
            self.in_doubt[entry.tool] += 1
            self.bus.report(
                SecurityError("in_doubt", error.removeprefix("in doubt: ")),
                subject=d.envelope.subject,
                data=d.data,
            )
        return ToolResult(ok=False, error=error)

    def _verify(self, d: Delivery, call: ToolCall) -> tuple[str, Decision, str]:
        """The decision's id, the decision and the intent hash, once the decision is shown to
        be governance's ``allow`` for exactly this call. Expiry and one use are the ledger's
        to check, since a retry may present a decision already used, or expired since."""
        workflow = d.envelope.workflow
        if d.envelope.subject != self.subjects.tool(call.tool):
            raise SecurityError("wrong_tool_subject", f"{call.tool!r} on {d.envelope.subject!r}")
        proof = self.bus.check(
            self.subjects.decision(d.claims.sub, workflow), call.decision, Decision, replay=False
        )
        decision: Decision = proof.body
        if proof.claims.role != GOVERNANCE_ROLE:
            raise SecurityError("decision_not_from_governance", f"signed by {proof.claims.sub!r}")
        if decision.workflow != workflow or decision.agent != d.claims.sub:
            raise SecurityError(
                "decision_for_another",
                f"decision for {decision.agent!r}/{decision.workflow!r}, "
                f"call from {d.claims.sub!r}/{workflow!r}",
            )
        if decision.outcome != "allow":
            raise SecurityError("decision_not_allow", f"outcome {decision.outcome!r}")
        intent = Intent(
            agent=d.claims.sub,
            role=d.claims.role,
            tool=call.tool,
            args=call.args,
            workflow=workflow,
            step=call.step,
        )
        digest = intent_hash(intent)
        if digest != decision.intent_hash:
            raise SecurityError("intent_mismatch", "the call differs from the decided intent")
        return proof.envelope.id, decision, digest

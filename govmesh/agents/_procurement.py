"""The procurement agent: plans a purchase, asks governance, and places the order through
the gateway."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Coroutine
from typing import Any, cast

import msgspec

from govmesh.agents._base import AgentService
from govmesh.agents.messages import InFlight, PurchaseOutcome, PurchaseRequest
from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.errors import BusError
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.identity import Identity
from govmesh.llm import ModelProvider
from govmesh.state.messages import SnapshotQuery, SnapshotReply
from govmesh.tools import ERP_CREATE_PO, ToolCall, ToolResult

__all__ = ["ProcurementAgent"]

log = logging.getLogger(__name__)

_SETTLE_GRACE_S = 60.0
"""Beyond an approval's expiry: governance's sweep, or another actor's takeover, settles it."""


class ProcurementAgent(AgentService):
    """Turns purchase requests into governed purchase orders.

    Args:
        decision_timeout_s: how long to wait for governance's first answer.
        approval_timeout_s: how long to wait for a human's answer to an escalation whose
            approval never lapses; one that lapses is waited for until it does.
        max_reflections: the agent's own stop for a model that keeps failing.
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        model: ModelProvider,
        max_tokens: int = 1024,
        decision_timeout_s: float = 30.0,
        approval_timeout_s: float = 300.0,
        max_reflections: int = 40,
    ) -> None:
        super().__init__(deployment, identity, model=model, max_tokens=max_tokens)
        self._decision_timeout_s = decision_timeout_s
        self._approval_timeout_s = approval_timeout_s
        self._max_reflections = max_reflections
        self._decisions: defaultdict[str, asyncio.Queue[Delivery]] = defaultdict(asyncio.Queue)
        self._resuming: set[asyncio.Task[None]] = set()
        self.resumed: Counter[str] = Counter()

    async def on_start(self) -> None:
        """Subscribe to purchase requests and to decisions."""
        await self.bus.subscribe(
            self.subjects.msg(self.agent_id), self._on_request, accepts=PurchaseRequest
        )
        await self.bus.subscribe(self.subjects.all("decision"), self._on_decision, accepts=Decision)
        self._spawn(self._resume_in_flight())

    async def _on_decision(self, d: Delivery) -> None:
        decision: Decision = d.body
        if decision.agent == self.agent_id and decision.workflow in self._decisions:
            self._decisions[decision.workflow].put_nowait(d)

    async def _next_decision(
        self, workflow: str, intent_id: str, *, final: bool, timeout: float
    ) -> Delivery:
        queue = self._decisions[workflow]
        async with asyncio.timeout(timeout):
            while True:
                d = await queue.get()
                decision: Decision = d.body
                if decision.intent_id == intent_id and (decision.final or not final):
                    return d

    def _approval_wait_s(self, escalated: Decision) -> float:
        """Wait for a human until the approval lapses (then governance settles it with the
        policy's default, a sweep later), or `approval_timeout_s` for one that never does."""
        if not escalated.approval_expires_at:
            return self._approval_timeout_s
        return max(0.0, escalated.approval_expires_at - time.time()) + _SETTLE_GRACE_S

    async def _on_request(self, d: Delivery) -> None:
        job = InFlight(
            request=d.body,
            requester=d.envelope.sender,
            causation=d.envelope.id,
            trace=d.envelope.trace,
        )
        # Recorded before any work, removed only once the outcome is sent: a workflow this
        # process dies in the middle of is found again by the next one (`_resume_in_flight`).
        await self.redis.hset(self._in_flight_key, d.envelope.workflow, msgspec.msgpack.encode(job))
        await self._serve(d.envelope.workflow, job)

    async def _serve(self, workflow: str, job: InFlight) -> None:
        self._decisions[workflow]
        try:
            outcome = await self._purchase(workflow, job.request, trace=job.trace)
        except (TimeoutError, BusError) as exc:
            outcome = PurchaseOutcome(result="failed", reasons=(f"{type(exc).__name__}: {exc}",))
        finally:
            self._decisions.pop(workflow, None)
            self.forget(workflow)
        await self._finish(workflow, job, outcome)

    async def _finish(self, workflow: str, job: InFlight, outcome: PurchaseOutcome) -> None:
        await self.bus.publish(
            self.subjects.msg(job.requester),
            outcome,
            workflow=workflow,
            causation=job.causation,
            trace=job.trace,
        )
        await self.redis.hdel(self._in_flight_key, workflow)

    @property
    def _in_flight_key(self) -> str:
        return self.key("in-flight", self.agent_id)

    async def _resume_in_flight(self) -> None:
        """Take up the workflows a previous process of this agent left unfinished.

        One that had not asked governance yet (its last snapshot says ``planning``) starts
        over: nothing it did had an effect. One that had is reported failed, saying where
        it stopped, so its requester is never left waiting; resuming those from their
        snapshots needs governance to answer a repeated intent with its first decision.
        """
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self._in_flight_key))
        decoder = msgspec.msgpack.Decoder(InFlight)
        for key, value in raw.items():
            workflow, job = key.decode(), decoder.decode(value)
            latest = await self._latest_snapshot(workflow)
            phase = latest.snapshot.goal.get("phase") if latest.snapshot else None
            if latest.snapshot is not None:
                # Versions go on from the last one stored, so "latest" stays the newest.
                self._versions[workflow] = latest.snapshot.version
            self.resumed[str(phase)] += 1
            if phase in (None, "planning"):
                self._spawn(self._serve(workflow, job))
            else:
                await self._finish(
                    workflow,
                    job,
                    PurchaseOutcome(
                        result="failed",
                        reasons=(f"agent restarted in phase {phase!r}; not resumed",),
                    ),
                )

    async def _latest_snapshot(self, workflow: str) -> SnapshotReply:
        """The state actor's latest snapshot of `workflow`, asking until it answers (it may
        be restarting too)."""
        while True:
            try:
                reply = await self.bus.request(
                    self.subjects.ctl("state"),
                    SnapshotQuery(workflow=workflow, agent=self.agent_id),
                    accepts=SnapshotReply,
                )
            except BusError as exc:
                log.warning("state actor not answering yet (%s); asking again", exc)
                await asyncio.sleep(1.0)
                continue
            answer: SnapshotReply = reply.body
            return answer

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._resuming.add(task)
        task.add_done_callback(self._resuming.discard)

    async def close(self) -> None:
        """Stop resumed workflows (they stay in flight for the next start), then leave."""
        for task in list(self._resuming):
            task.cancel()
        await asyncio.gather(*self._resuming, return_exceptions=True)
        await super().close()

    async def _purchase(
        self, workflow: str, req: PurchaseRequest, *, trace: str
    ) -> PurchaseOutcome:
        goal = {"item": req.item, "vendor": req.vendor, "amount_usd": req.amount_usd}
        await self.snapshot(workflow, {**goal, "phase": "planning"})
        _, reflections = await self.think_until_usable(
            workflow,
            f"Plan a purchase of {req.item} from {req.vendor} for ${req.amount_usd:,.2f}.",
            key=f"{self.agent_id}:plan",
            max_reflections=self._max_reflections,
            trace=trace,
        )
        step = 1
        args = {"item": req.item, "vendor": req.vendor, "amount_usd": req.amount_usd}
        authority = self.bus.tokens.verify(self.identity.token).budget_usd
        if req.amount_usd > authority:
            # Governance would drop the intent as a security event; a well-behaved agent
            # never asks beyond the authority its own token states.
            return PurchaseOutcome(
                result="denied",
                reasons=(f"amount {req.amount_usd} is over this agent's authority {authority}",),
                reflections=reflections,
                model_calls=reflections + 1,
            )
        started = time.perf_counter()
        sent = await self.bus.publish(
            self.subjects.intent(self.agent_id),
            ToolIntent(tool=ERP_CREATE_PO, args=args, step=step, reflections=reflections),
            workflow=workflow,
            trace=trace,
        )
        first = await self._next_decision(
            workflow, sent.id, final=False, timeout=self._decision_timeout_s
        )
        governance_ms = (time.perf_counter() - started) * 1000
        first_decision: Decision = first.body
        paused = not first_decision.final
        await self.snapshot(
            workflow,
            {
                **goal,
                "phase": "awaiting_approval" if paused else "decided",
                "decision": first_decision.outcome,
                "approval_id": first_decision.approval_id,
            },
            policy_hash=first_decision.policy_hash,
        )
        final = first
        if paused:
            final = await self._next_decision(
                workflow, sent.id, final=True, timeout=self._approval_wait_s(first_decision)
            )
        decision: Decision = final.body
        outcome = PurchaseOutcome(
            result="denied",
            first_decision=first_decision.outcome,
            reasons=decision.reasons,
            approval_id=decision.approval_id,
            approved_by=decision.approved_by,
            reflections=reflections,
            governance_ms=governance_ms,
            model_calls=reflections + 1,
        )
        if decision.outcome != "allow":
            return msgspec.structs.replace(
                outcome, result="rejected" if decision.approval_id else "denied"
            )
        reply = await self.bus.request(
            self.subjects.tool(ERP_CREATE_PO),
            ToolCall(tool=ERP_CREATE_PO, args=args, step=step, decision=final.data),
            accepts=ToolResult,
            workflow=workflow,
            causation=final.envelope.id,
            trace=trace,
        )
        tool_result: ToolResult = reply.body
        await self.snapshot(
            workflow,
            {**goal, "phase": "done", "ok": tool_result.ok, "order": tool_result.result},
            policy_hash=decision.policy_hash,
        )
        if not tool_result.ok:
            return msgspec.structs.replace(outcome, result="failed", reasons=(tool_result.error,))
        return msgspec.structs.replace(
            outcome, result="executed", order_id=str(tool_result.result.get("po_id", ""))
        )

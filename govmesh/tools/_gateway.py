"""The tool gateway: the policy enforcement point. No tool runs without a valid decision."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.errors import SecurityError
from govmesh.governance._actor import GOVERNANCE_ROLE
from govmesh.governance._evaluator import Intent, intent_hash
from govmesh.governance.messages import Decision
from govmesh.identity import Claims, Identity
from govmesh.service import Service
from govmesh.tools._erp import ERP_CREATE_PO, SimulatedErp
from govmesh.tools._registry import Tool, ToolContext
from govmesh.tools.messages import ToolCall, ToolResult

__all__ = ["GatewayService"]

QUEUE = "gateway"


def _authorize_call(claims: Claims, call: ToolCall) -> None:
    claims.require(call.tool)


class GatewayService(Service):
    """Runs a tool call only when it carries a governance decision that is signed, unexpired,
    ``allow``, unused, for this workflow and agent, and bound to the hash of exactly this call.

    Agents hold no tool credentials: tools live here. Every refusal is a security event.
    """

    def __init__(self, deployment: Deployment, identity: Identity) -> None:
        super().__init__(deployment, identity)
        self.tools: dict[str, Tool] = {}
        self.ran: Counter[str] = Counter()

    async def on_start(self) -> None:
        """Register the tools and subscribe to tool calls."""
        erp = SimulatedErp(self.redis, prefix=self.deployment.key_prefix)
        self.tools[ERP_CREATE_PO] = erp.create_purchase_order
        await self.bus.subscribe(
            self.subjects.all("tool"),
            self._on_call,
            accepts=ToolCall,
            queue=QUEUE,
            authorize=_authorize_call,
        )

    def stats(self) -> dict[str, Any]:
        """Counters, plus tool runs."""
        return {**super().stats(), "ran": dict(self.ran)}

    async def _on_call(self, d: Delivery) -> None:
        call: ToolCall = d.body
        try:
            decision_id, decision = await self._authorise(d, call)
        except SecurityError as exc:
            self.bus.report(exc, subject=d.envelope.subject, data=d.data)
            await self.bus.respond(d, ToolResult(ok=False, error=f"refused: {exc}"))
            return
        tool = self.tools.get(call.tool)
        if tool is None:
            await self.bus.respond(d, ToolResult(ok=False, error=f"no tool {call.tool!r}"))
            return
        ctx = ToolContext(
            workflow=d.envelope.workflow,
            agent=d.claims.sub,
            step=call.step,
            decision_id=decision_id,
            approval_id=decision.approval_id,
            approved_by=decision.approved_by,
        )
        try:
            result = await tool(call.args, ctx)
        except (ValueError, TypeError) as exc:
            await self.bus.respond(d, ToolResult(ok=False, error=f"{call.tool}: {exc}"))
            return
        self.ran[call.tool] += 1
        await self.bus.respond(d, ToolResult(ok=True, result=result))

    async def _authorise(self, d: Delivery, call: ToolCall) -> tuple[str, Decision]:
        workflow = d.envelope.workflow
        if d.envelope.subject != self.subjects.tool(call.tool):
            raise SecurityError("wrong_tool_subject", f"{call.tool!r} on {d.envelope.subject!r}")
        proof = self.bus.check(
            self.subjects.decision(workflow), call.decision, Decision, replay=False
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
        if decision.expires_at <= time.time():
            raise SecurityError("decision_expired", f"expired at {decision.expires_at}")
        intent = Intent(
            agent=d.claims.sub,
            role=d.claims.role,
            tool=call.tool,
            args=call.args,
            workflow=workflow,
            step=call.step,
        )
        if intent_hash(intent) != decision.intent_hash:
            raise SecurityError("intent_mismatch", "the call differs from the decided intent")
        # Claimed atomically so a decision can authorise one execution only, even with
        # several gateways in the queue group.
        fresh = await self.redis.set(
            self.key("decision-used", proof.envelope.id), d.envelope.id, nx=True, ex=86_400
        )
        if not fresh:
            raise SecurityError("decision_reused", f"decision {proof.envelope.id} already used")
        return proof.envelope.id, decision

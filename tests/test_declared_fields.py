"""What people see of a tool that spends nothing: on real servers, one workflow waiting for
an approval and one finished go through `govmesh watch`, `govmesh approvals list`,
`govmesh audit show` and `govmesh audit export`, and each shows the arguments the tool
declares to show, the start's payload and the result by name, and nothing about amounts or
vendors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from rich.console import Console
from test_cli import GOVMESH, ROOT, _env

from govmesh.agents.messages import Outcome, WorkflowStart
from govmesh.bus import Bus, ensure_event_stream
from govmesh.cli._watch import _board_view
from govmesh.governance._actor import GovernanceService
from govmesh.governance._approvals import ApprovalStore
from govmesh.governance._starts import record_start
from govmesh.governance.messages import ApprovalRequest, Decision
from govmesh.observability import AuditConsumer, AuditIndex, StreamVerifier
from govmesh.observability._watch import WatchBoard, WatchedEvent
from govmesh.roles import AUDITOR_ROLE, COORDINATOR_ROLE, GOVERNANCE_ROLE, OPERATOR_ROLE
from govmesh.runtime import OPERATOR_MEMBER, WATCH_MEMBER, Member, advertise

from _deploy import deployment

SEED = ROOT / "policies" / "procurement-agent-v2.yaml"
AGENT = "expenses-1"
COORDINATOR = "coordinator-1"
APPROVAL = uuid.uuid4().hex
TOOL = "expenses.flag_claim"
"""A tool that spends nothing and declares ``show=("category", "memo")``."""


class Claim(msgspec.Struct, frozen=True):
    """A start payload, as a workload makes them."""

    employee: str
    category: str
    memo: str


def _govmesh(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GOVMESH, *args],
        cwd=ROOT,
        env=_env(uuid.uuid4().hex, home) | {"COLUMNS": "240"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _nothing_monetary(text: str) -> None:
    lowered = text.lower()
    assert "amount" not in lowered and "vendor" not in lowered, text


async def test_a_tool_without_spend_shows_its_declared_fields_in_watch_approvals_and_audit(
    tmp_path: Path,
    secure_nats,
    redis_server,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    transport.register(
        [
            Member.for_role(OPERATOR_MEMBER, OPERATOR_ROLE, tenant=prefix),
            Member.for_role(WATCH_MEMBER, AUDITOR_ROLE, tenant=prefix),
        ]
    )
    home = tmp_path / "home"
    monkeypatch.setenv("GOVMESH_HOME", str(home))
    governance = GovernanceService(
        dep, issuer.identity("governance-1", GOVERNANCE_ROLE), policy_paths=[str(SEED)]
    )
    await governance.start()
    coordinator = await Bus.connect(dep, issuer.identity(COORDINATOR, COORDINATOR_ROLE))
    agent = await Bus.connect(dep, issuer.identity(AGENT, "Expense-Agent", capabilities=(TOOL,)))
    # Announces what governance decided, as the governance actor would for this tool.
    announcer = await Bus.connect(dep, issuer.identity("governance-2", GOVERNANCE_ROLE))
    auditor = await Bus.connect(dep, issuer.identity("auditor-1", AUDITOR_ROLE))
    r = aioredis.Redis.from_url(redis_server.url)
    index = AuditIndex(r, prefix=dep.key_prefix)
    consumer = AuditConsumer(
        auditor.nc, index, tenant=prefix, verifier=StreamVerifier.of(dep), batch=10
    )
    waiting, done = f"{prefix}-waiting", f"{prefix}-done"
    try:
        await ensure_event_stream(coordinator.nc, prefix)
        for workflow, claim in (
            (waiting, Claim(employee="e-17", category="travel", memo="team offsite")),
            (done, Claim(employee="e-4", category="meals", memo="client lunch")),
        ):
            await record_start(coordinator, workflow, (AGENT,))
            start = WorkflowStart(kind="Claim", body=msgspec.msgpack.encode(claim))
            await coordinator.publish(coordinator.subjects.msg(AGENT), start, workflow=workflow)
            await announcer.publish(
                announcer.subjects.decision(AGENT, workflow),
                Decision(
                    intent_id=f"i-{workflow}",
                    intent_hash=f"h-{workflow}",
                    workflow=workflow,
                    agent=AGENT,
                    outcome="escalate" if workflow == waiting else "allow",
                    policy_hash=governance.policies.hash,
                    expires_at=time.time() + 60,
                    final=workflow != waiting,
                    approval_id=APPROVAL if workflow == waiting else "",
                ),
                workflow=workflow,
            )
        request = ApprovalRequest(
            approval_id=APPROVAL,
            workflow=waiting,
            agent=AGENT,
            tool=TOOL,
            args={"employee": "e-17", "category": "travel", "memo": "team offsite"},
            shown={"category": "travel", "memo": "team offsite"},
            intent_id=f"i-{waiting}",
            intent_hash=f"h-{waiting}",
            reasons=("travel and entertainment need a manager",),
            escalation="human_review",
            policy_hash=governance.policies.hash,
            requested_at=time.time(),
        )
        await ApprovalStore(r, dep.key_prefix).add(request)
        await announcer.publish(announcer.subjects.approval(waiting), request, workflow=waiting)
        outcome = Outcome(
            result="completed",
            first_decision="allow",
            model_calls=1,
            shown={"tool": TOOL, "category": "meals", "memo": "client lunch"},
            value=msgspec.msgpack.encode({"ticket": "T-7"}),
        )
        await agent.publish(agent.subjects.msg(COORDINATOR), outcome, workflow=done)
        for bus in (coordinator, announcer, agent):
            await bus.flush()
        info = await auditor.nc.jetstream().stream_info(auditor.subjects.event_stream)
        events = info.state.messages
        assert events == 8, "two start records, two starts, two decisions, a request, an outcome"
        await consumer.start()

        async with advertise(dep, issuer, ca=transport.ca, what="declared fields"):
            listed, watched = tmp_path / "pending.json", tmp_path / "watched.json"
            approvals = await asyncio.to_thread(
                _govmesh, ["approvals", "list", "--json", str(listed)], home
            )
            follow = ["watch", "--replay", "--lines", "-n", str(events), "--json", str(watched)]
            watch = await asyncio.to_thread(_govmesh, follow, home)
            deny = ["approvals", "deny", APPROVAL, "--by", "bob", "--reason", "not this quarter"]
            denied = await asyncio.to_thread(_govmesh, deny, home)

        # approvals list: who asks for which tool, with what the tool declares to show.
        assert approvals.returncode == 0, approvals.stderr
        assert f"{AGENT}: {TOOL} category=travel memo=team offsite" in approvals.stdout
        assert "travel and entertainment need a manager" in approvals.stdout
        _nothing_monetary(approvals.stdout)
        [pending] = json.loads(listed.read_text())
        assert pending["shown"] == {"category": "travel", "memo": "team offsite"}
        assert denied.returncode == 0, denied.stderr
        assert (
            f"({waiting}, {TOOL} category=travel memo=team offsite): deny; "
            "travel and entertainment need a manager; rejected by bob"
        ) in denied.stdout, denied.stdout
        _nothing_monetary(denied.stdout)

        # watch: the lines, and the dashboard folded from the same events.
        assert watch.returncode == 0, watch.stderr
        lines = watch.stdout
        assert "WorkflowStart coordinator-1: kind=Claim employee=e-17 category=travel" in lines
        assert (
            f"ApprovalRequest governance-2: approval_id={APPROVAL} tool=expenses.flag_claim "
            "escalation=human_review" in lines
        )
        assert "category=travel memo=team offsite" in lines
        assert (
            f"Outcome {AGENT}: result=completed first_decision=allow tool=expenses.flag_claim "
            "category=meals memo=client lunch ticket=T-7" in lines
        )
        _nothing_monetary(lines)
        seen = json.loads(watched.read_text())
        board = seen["board"]
        assert [(p["workflow"], p["tool"], p["shown"]) for p in board["pending"]] == [
            (waiting, TOOL, {"category": "travel", "memo": "team offsite"})
        ]
        assert (board["started"], board["in_flight"], board["finished"]) == (
            2,
            1,
            {"completed": 1},
        )
        replayed = WatchBoard()
        for event in msgspec.convert(seen["events"], list[WatchedEvent]):
            replayed.add(event)
        console = Console(width=200, record=True, color_system=None)
        console.print(_board_view(replayed.snapshot(time.time()), "govmesh watch"))
        dashboard = console.export_text()
        assert "category=travel memo=team offsite" in dashboard
        assert "completed 1" in dashboard and "pending approvals: 1" in dashboard
        _nothing_monetary(dashboard)

        # audit show: each event with what its sender's code declared.
        deadline = time.monotonic() + 20
        while consumer.stored < events:
            assert time.monotonic() < deadline, f"{consumer.stored} of {events} indexed"
            await asyncio.sleep(0.05)
        where = ["--redis-url", redis_server.url, "--tenant", prefix]
        shown = await asyncio.to_thread(_govmesh, ["audit", "show", waiting, *where], home)
        finished = await asyncio.to_thread(_govmesh, ["audit", "show", done, *where], home)
        for result in (shown, finished):
            assert result.returncode == 0, result.stderr
            _nothing_monetary(result.stdout)
        # Declared fields come after the kind's own, in name order (as the record keeps them).
        assert (
            "WorkflowStart from coordinator-1 kind=Claim category=travel employee=e-17 "
            "memo=team offsite"
        ) in shown.stdout
        assert (
            f"ApprovalRequest from governance-2 approval_id={APPROVAL} tool=expenses.flag_claim "
            "escalation=human_review"
        ) in shown.stdout
        [request_line] = [line for line in shown.stdout.splitlines() if "ApprovalRequest" in line]
        assert request_line.endswith("category=travel memo=team offsite")
        assert (
            f"Outcome from {AGENT} result=completed first_decision=allow "
            "tool=expenses.flag_claim category=meals memo=client lunch ticket=T-7"
        ) in finished.stdout

        # audit export: the bundle says how the workflow ended, with the shown arguments.
        bundle_path = tmp_path / "bundle.json"
        exported = await asyncio.to_thread(
            _govmesh, ["audit", "export", done, *where, "--out", str(bundle_path)], home
        )
        assert exported.returncode == 0, exported.stderr
        assert "ended completed; chain intact" in exported.stdout
        bundle = json.loads(bundle_path.read_text())
        assert {k: v for k, v in bundle["outcome"].items() if k not in ("event", "ts")} == {
            "agent": AGENT,
            "result": "completed",
            "first_decision": "allow",
            "tool": TOOL,
            "fields": {"category": "meals", "memo": "client lunch", "ticket": "T-7"},
        }
        _nothing_monetary(json.dumps(bundle["events"]) + json.dumps(bundle["outcome"]))
    finally:
        await consumer.close()
        for bus in (coordinator, agent, announcer, auditor):
            await bus.close()
        await governance.close()
        await r.aclose()

"""`govmesh watch`'s board: what the live dashboard shows, folded from events built from
real message bodies and summarized as the watcher summarizes them."""

from __future__ import annotations

import itertools

import msgspec
from rich.console import Console

from govmesh.agents.messages import Outcome, WorkflowStart
from govmesh.bus import SecurityEvent
from govmesh.cli._watch import _board_view, _event_line
from govmesh.forecasting.messages import Usage
from govmesh.governance.messages import ApprovalAnswer, ApprovalRequest, Decision, StartRecord
from govmesh.observability import RefusedMessage, declared_fields, summarize_body
from govmesh.observability._watch import WatchBoard, WatchedEvent
from govmesh.tools.messages import ToolResult

POLICY_A, POLICY_B = "a" * 64, "b" * 64
COORDINATOR = "coordinator-1"
TOOL = "erp.create_purchase_order"
_ids = itertools.count()


class Order(msgspec.Struct, frozen=True):
    """A start payload, as a workload generator makes them."""

    item: str
    vendor: str
    amount_usd: float


def _event(
    body: msgspec.Struct,
    *,
    workflow: str,
    ts: float = 1000.0,
    sender: str = "x",
    subject: str = "",
) -> WatchedEvent:
    kind = type(body).__name__
    return WatchedEvent(
        ts=ts,
        workflow=workflow,
        kind=kind,
        sender=sender,
        subject=subject or f"gm.t.{kind.lower()}",
        id=f"e{next(_ids)}",
        causation="",
        summary=summarize_body(kind, msgspec.msgpack.encode(body)),
    )


def _start(workflow: str, *, to: str = "buyer-1", sender: str = COORDINATOR) -> WatchedEvent:
    """A workflow start, as the coordinator sends it (or an agent asking another)."""
    body = Order(item="laptops", vendor="Vendor_A", amount_usd=1.0)
    start = WorkflowStart(kind="Order", body=msgspec.msgpack.encode(body))
    return _event(start, workflow=workflow, sender=sender, subject=f"gm.t.msg.{to}")


def _decision(
    workflow: str, outcome: str, *, policy: str = POLICY_A, approval: str = "", final: bool = True
) -> WatchedEvent:
    body = Decision(
        intent_id="i",
        intent_hash=f"intent-of-{workflow}",
        workflow=workflow,
        agent="buyer-1",
        outcome=outcome,
        policy_hash=policy,
        expires_at=0.0,
        final=final,
        approval_id=approval,
    )
    return _event(body, workflow=workflow, sender="governance-1")


def _request(workflow: str, approval: str, *, amount: float, ts: float) -> WatchedEvent:
    args = {"amount_usd": amount, "vendor": "Vendor_A", "item": "laptops"}
    body = _approval(
        workflow, approval, args=args, shown={"vendor": "Vendor_A", "amount_usd": amount}
    )
    return _event(body, workflow=workflow, ts=ts, sender="governance-1")


def _approval(
    workflow: str, approval: str, *, args: dict[str, object], shown: dict[str, object]
) -> ApprovalRequest:
    return ApprovalRequest(
        approval_id=approval,
        workflow=workflow,
        agent="buyer-1",
        tool=TOOL,
        args=args,
        shown=shown,
        intent_id="i",
        intent_hash=f"intent-of-{workflow}",
        reasons=("over 5000",),
        escalation="human_review",
        policy_hash=POLICY_A,
        requested_at=1000.0,
    )


def _usage(
    workflow: str, *, tokens_in: int, tokens_out: int, cost: float, ts: float
) -> WatchedEvent:
    body = Usage(model="sim", input_tokens=tokens_in, output_tokens=tokens_out, cost_usd=cost)
    return _event(body, workflow=workflow, ts=ts, sender="requester-1")


def _done(workflow: str, result: str, *, to: str = COORDINATOR) -> WatchedEvent:
    """The entry agent's outcome to whoever started the workflow (or, with ``to``, one
    agent's answer to another that asked it)."""
    outcome = Outcome(
        result=result,  # type: ignore[arg-type]
        first_decision="allow",
        model_calls=2,
        shown={"tool": TOOL, "vendor": "Vendor_A", "amount_usd": 1.0},
        value=msgspec.msgpack.encode({"po_id": "PO-1"}),
    )
    return _event(outcome, workflow=workflow, sender="buyer-1", subject=f"gm.t.msg.{to}")


def test_board_counts_first_decisions_by_outcome_and_settlements_apart() -> None:
    board = WatchBoard()
    for event in [
        _decision("w1", "allow"),
        _decision("w2", "deny", policy=POLICY_B),
        _decision("w3", "escalate", approval="ap3", final=False),
        _decision("w4", "escalate", approval="ap4", final=False),
        _decision("w3", "allow", approval="ap3"),
        _decision("w4", "deny", approval="ap4"),
    ]:
        board.add(event)
    snap = board.snapshot(1000.0)
    assert snap.decisions == {"allow": 1, "deny": 1, "escalate": 2}
    assert snap.settled == {"allow": 1, "deny": 1}
    assert snap.policy_hashes == {POLICY_A: 5, POLICY_B: 1}
    assert snap.events == 6


def test_an_answer_or_a_settling_decision_or_the_workflow_end_removes_a_pending_approval() -> None:
    board = WatchBoard()
    for event in [
        _request("w1", "ap1", amount=7000.0, ts=1000.0),
        _request("w2", "ap2", amount=8000.0, ts=1001.0),
        _request("w3", "ap3", amount=6500.5, ts=999.0),
    ]:
        board.add(event)
    pending = board.snapshot(1010.0).pending
    assert [(a.approval_id, a.workflow, a.shown) for a in pending] == [
        ("ap3", "w3", {"vendor": "Vendor_A", "amount_usd": 6500.5}),
        ("ap1", "w1", {"vendor": "Vendor_A", "amount_usd": 7000.0}),
        ("ap2", "w2", {"vendor": "Vendor_A", "amount_usd": 8000.0}),
    ]
    assert {(a.tool, a.escalation) for a in pending} == {(TOOL, "human_review")}

    board.add(_event(ApprovalAnswer(approval_id="ap1", approved=True, by="alice"), workflow="w1"))
    board.add(_decision("w2", "deny", approval="ap2"))  # lapsed: its expiry decided
    snap = board.snapshot(1010.0)
    assert [a.approval_id for a in snap.pending] == ["ap3"]
    assert [(a.approval_id, a.by, a.approved, a.tool) for a in snap.answers] == [
        ("ap1", "alice", True, TOOL)
    ]

    board.add(_event(ApprovalAnswer(approval_id="ap3", approved=False, by="bob"), workflow="w3"))
    board.add(_start("w4"))
    board.add(_request("w4", "ap4", amount=9000.0, ts=1002.0))
    board.add(_done("w4", "halted"))
    snap = board.snapshot(1010.0)
    assert snap.pending == []
    assert [(a.by, a.approved) for a in snap.answers] == [("bob", False), ("alice", True)]


def test_board_sums_cost_per_workflow_in_flight_and_tokens_of_the_last_minute() -> None:
    board = WatchBoard(top=2)
    for event in [
        _start("w1"),
        _start("w2"),
        _usage("w1", tokens_in=1000, tokens_out=200, cost=0.006, ts=900.0),
        _usage("w2", tokens_in=2000, tokens_out=300, cost=0.009, ts=990.0),
        _usage("w1", tokens_in=1000, tokens_out=100, cost=0.0045, ts=995.0),
        _usage("w3", tokens_in=500, tokens_out=50, cost=0.00225, ts=999.0),
        _usage("", tokens_in=10, tokens_out=0, cost=0.00003, ts=999.0),
    ]:
        board.add(event)
    snap = board.snapshot(1000.0)
    assert [(w.workflow, w.calls, w.tokens, w.tokens_last_min) for w in snap.spend] == [
        ("w1", 2, 2300, 1100),
        ("w2", 1, 2300, 2300),
    ]
    assert abs(snap.spend[0].cost_usd - 0.0105) < 1e-12
    assert snap.calls == 5 and snap.tokens == 5160
    assert abs(snap.cost_usd - 0.02178) < 1e-12
    assert snap.tokens_last_min == 1100 + 2300 + 550 + 10
    assert snap.in_flight == 3

    board.add(_done("w2", "completed"))
    board.add(_usage("w2", tokens_in=100, tokens_out=0, cost=0.0003, ts=1000.0))  # late
    snap = board.snapshot(1060.0)
    assert [w.workflow for w in snap.spend] == ["w1", "w3"]  # w2 finished; spend kept in total
    assert snap.tokens == 5260 and abs(snap.cost_usd - 0.02208) < 1e-12
    assert snap.tokens_last_min == 100  # only the call at 1000 s is within the minute
    assert snap.in_flight == 2


def test_security_events_are_counted_per_reason_and_claimed_sender() -> None:
    board = WatchBoard()
    for reason, sender in [
        ("bad_signature", "mallory"),
        ("replay", "mallory"),
        ("bad_signature", "mallory"),
        ("bad_signature", ""),
    ]:
        body = SecurityEvent(
            reason=reason, subject="gm.t.msg.a", claimed_sender=sender, receiver="a"
        )
        board.add(_event(body, workflow="", sender="a"))
    assert [(s.reason, s.sender, s.count) for s in board.snapshot(0.0).security] == [
        ("bad_signature", "mallory", 2),
        ("replay", "mallory", 1),
        ("bad_signature", "?", 1),
    ]


def test_a_message_refused_on_the_stream_is_a_security_event_and_its_claims_are_not_believed() -> (
    None
):
    board = WatchBoard()
    forged = RefusedMessage(
        seq=7,
        stored_at=1000.0,
        subject="gm.t.msg.buyer-1",
        reason="sender_mismatch",
        claimed_sender="governance-1",
        kind="Decision",
        workflow="wf-forged",
        id="abc",
    )
    garbage = RefusedMessage(seq=8, stored_at=1001.0, subject="gm.t.security", reason="malformed")
    for refused in (forged, garbage):
        board.add(WatchedEvent.of(refused))
    snap = board.snapshot(1002.0)
    assert snap.refused == 2 and snap.events == 2
    assert [(s.reason, s.sender, s.count) for s in snap.security] == [
        ("sender_mismatch", "governance-1", 1),
        ("malformed", "?", 1),
    ]
    assert snap.decisions == {} and snap.in_flight == 0 and snap.started == 0
    event = snap.tail[0]
    assert (event.kind, event.workflow, event.refused) == ("SecurityEvent", "wf-forged", True)
    assert event.summary["claimed_kind"] == "Decision" and event.summary["stream_seq"] == 7
    console = Console(width=200, record=True)
    console.print(_board_view(snap, "govmesh watch: t"))
    console.print(_event_line(event))
    text = console.export_text()
    assert "2 refused on the stream" in text
    assert "refused sender_mismatch on gm.t.msg.buyer-1 (stream #7)" in text
    assert "claimed kind=Decision sender=governance-1 workflow=wf-forged" in text


def test_workflows_are_counted_started_and_finished_once_by_result() -> None:
    board = WatchBoard(tail=3)
    for workflow in ("w1", "w2", "w3", "w1"):  # w1 started again after a restart
        board.add(_start(workflow))
    for event in [_done("w1", "completed"), _done("w2", "halted"), _done("w2", "halted")]:
        board.add(event)
    snap = board.snapshot(0.0)
    assert (snap.started, snap.in_flight) == (3, 1)
    assert snap.finished == {"completed": 1, "halted": 1}
    assert [(e.kind, e.workflow) for e in snap.tail] == [
        ("Outcome", "w1"),
        ("Outcome", "w2"),
        ("Outcome", "w2"),
    ]


def test_an_outcome_ends_a_workflow_only_when_it_reaches_whoever_started_it() -> None:
    board = WatchBoard()
    board.add(_event(StartRecord(agents=("buyer-1",)), workflow="w1", sender=COORDINATOR))
    board.add(_start("w1"))
    # The buyer asked a negotiator to take part: its answer is not the workflow's end.
    board.add(_start("w1", sender="buyer-1", to="negotiator-1"))
    board.add(_done("w1", "denied", to="buyer-1"))
    snap = board.snapshot(0.0)
    assert (snap.started, snap.in_flight, snap.finished) == (1, 1, {})
    board.add(_done("w1", "completed"))
    # A workflow whose start came before the watch joined ends on an outcome to a coordinator.
    board.add(_event(Usage(model="m", input_tokens=1, output_tokens=1), workflow="w2"))
    board.add(_done("w2", "completed", to="buyer-1"))
    board.add(_done("w2", "failed"))
    snap = board.snapshot(0.0)
    assert snap.finished == {"completed": 1, "failed": 1} and snap.in_flight == 0


def test_an_intent_asked_again_is_one_decision_and_does_not_reopen_its_approval() -> None:
    board = WatchBoard()
    for _ in range(3):  # the agent heard nothing and asked again; governance answered again
        board.add(_request("w1", "ap1", amount=7000.0, ts=1000.0))
        board.add(_decision("w1", "escalate", approval="ap1", final=False))
    assert board.snapshot(1000.0).decisions == {"escalate": 1}
    assert len(board.snapshot(1000.0).pending) == 1
    board.add(_event(ApprovalAnswer(approval_id="ap1", approved=True, by="alice"), workflow="w1"))
    board.add(_decision("w1", "allow", approval="ap1"))
    board.add(_request("w1", "ap1", amount=7000.0, ts=1001.0))
    board.add(_decision("w1", "allow", approval="ap1"))
    board.add(_decision("w2", "escalate", approval="ap2", final=False))
    snap = board.snapshot(1001.0)
    assert snap.decisions == {"escalate": 2} and snap.settled == {"allow": 1}
    assert snap.pending == []


def test_the_dashboard_shows_the_board_and_prints_stream_text_literally() -> None:
    board = WatchBoard()
    board.add(_decision("wf-[red]x[/]", "escalate", approval="ap1", final=False))
    board.add(_request("wf-[red]x[/]", "ap1", amount=7250.0, ts=940.0))
    body = SecurityEvent(reason="bad_signature", subject="s", claimed_sender="mallory")
    board.add(_event(body, workflow=""))
    console = Console(width=160, record=True, color_system=None)
    console.print(_board_view(board.snapshot(1000.0), "govmesh watch: t"))
    text = console.export_text()
    assert "escalate 1" in text and "allow 0" in text
    assert "pending approvals: 1" in text
    assert "wf-[red]x[/]" in text and "1.0m" in text
    assert "vendor=Vendor_A" in text and "amount_usd=7250.0" in text
    assert "bad_signature" in text and "mallory" in text


def test_summaries_show_what_tools_and_workloads_declare_by_name() -> None:
    request = _request("w1", "ap1", amount=7000.0, ts=1.0).summary
    assert request == {
        "approval_id": "ap1",
        "tool": TOOL,
        "escalation": "human_review",
        "policy_hash": POLICY_A,
        "vendor": "Vendor_A",
        "amount_usd": 7000.0,
    }
    assert "item" not in request, "only the arguments the tool declares to show"
    assert _start("w1").summary == {
        "kind": "Order",
        "item": "laptops",
        "vendor": "Vendor_A",
        "amount_usd": 1.0,
    }
    assert _done("w1", "rejected").summary == {
        "result": "rejected",
        "first_decision": "allow",
        "tool": TOOL,
        "vendor": "Vendor_A",
        "amount_usd": 1.0,
        "po_id": "PO-1",
    }
    result = ToolResult(ok=True, result={"po_id": "PO-9", "ok": "yes", "lines": [1, 2]})
    assert summarize_body("ToolResult", msgspec.msgpack.encode(result)) == {
        "ok": True,
        "replayed": False,
        "retryable": False,
        "po_id": "PO-9",
        "result.ok": "yes",  # a name the result shares with a field of its own
        "lines": "[1,2]",
    }


def test_an_old_approval_request_without_shown_arguments_shows_them_all() -> None:
    body = _approval("w1", "ap1", args={"memo": "team dinner", "escalation": "x"}, shown={})
    summary = summarize_body("ApprovalRequest", msgspec.msgpack.encode(body))
    assert declared_fields("ApprovalRequest", summary) == {
        "memo": "team dinner",
        "args.escalation": "x",
    }
    odd = msgspec.msgpack.encode({"type": "ApprovalRequest", "approval_id": "a", "args": [1]})
    assert summarize_body("ApprovalRequest", odd) == {"approval_id": "a", "args": "[1]"}

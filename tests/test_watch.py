"""`govmesh watch`'s board: what the live dashboard shows, folded from events built from
real message bodies and summarized as the watcher summarizes them."""

from __future__ import annotations

import itertools

import msgspec
from rich.console import Console

from govmesh.agents.messages import PurchaseOutcome, WorkflowDone, WorkflowStart
from govmesh.bus import SecurityEvent
from govmesh.cli._watch import _board_view, _event_line
from govmesh.forecasting.messages import Usage
from govmesh.governance.messages import ApprovalAnswer, ApprovalRequest, Decision
from govmesh.observability import RefusedMessage, summarize_body
from govmesh.observability._watch import WatchBoard, WatchedEvent

POLICY_A, POLICY_B = "a" * 64, "b" * 64
_ids = itertools.count()


def _event(
    body: msgspec.Struct, *, workflow: str, ts: float = 1000.0, sender: str = "x"
) -> WatchedEvent:
    kind = type(body).__name__
    return WatchedEvent(
        ts=ts,
        workflow=workflow,
        kind=kind,
        sender=sender,
        subject=f"gm.t.{kind.lower()}",
        id=f"e{next(_ids)}",
        causation="",
        summary=summarize_body(kind, msgspec.msgpack.encode(body)),
    )


def _decision(
    workflow: str, outcome: str, *, policy: str = POLICY_A, approval: str = "", final: bool = True
) -> WatchedEvent:
    body = Decision(
        intent_id="i",
        intent_hash=f"intent-of-{workflow}",
        workflow=workflow,
        agent="procurement-1",
        outcome=outcome,
        policy_hash=policy,
        expires_at=0.0,
        final=final,
        approval_id=approval,
    )
    return _event(body, workflow=workflow, sender="governance-1")


def _request(workflow: str, approval: str, *, amount: float, ts: float) -> WatchedEvent:
    body = ApprovalRequest(
        approval_id=approval,
        workflow=workflow,
        agent="procurement-1",
        tool="erp.create_purchase_order",
        args={"amount_usd": amount, "vendor": "Vendor_A", "item": "laptops"},
        intent_id="i",
        intent_hash=f"intent-of-{workflow}",
        reasons=("over 5000",),
        escalation="human_review",
        policy_hash=POLICY_A,
        requested_at=ts,
    )
    return _event(body, workflow=workflow, ts=ts, sender="governance-1")


def _usage(
    workflow: str, *, tokens_in: int, tokens_out: int, cost: float, ts: float
) -> WatchedEvent:
    body = Usage(model="sim", input_tokens=tokens_in, output_tokens=tokens_out, cost_usd=cost)
    return _event(body, workflow=workflow, ts=ts, sender="requester-1")


def _done(workflow: str, result: str) -> WatchedEvent:
    outcome = PurchaseOutcome(result=result)
    return _event(WorkflowDone(outcome=outcome, model_calls=2), workflow=workflow)


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
    assert [(a.approval_id, a.workflow, a.amount_usd) for a in pending] == [
        ("ap3", "w3", 6500.5),
        ("ap1", "w1", 7000.0),
        ("ap2", "w2", 8000.0),
    ]
    assert {(a.tool, a.vendor, a.escalation) for a in pending} == {
        ("erp.create_purchase_order", "Vendor_A", "human_review")
    }

    board.add(_event(ApprovalAnswer(approval_id="ap1", approved=True, by="alice"), workflow="w1"))
    board.add(_decision("w2", "deny", approval="ap2"))  # lapsed: its expiry decided
    snap = board.snapshot(1010.0)
    assert [a.approval_id for a in snap.pending] == ["ap3"]
    assert [(a.approval_id, a.by, a.approved, a.tool) for a in snap.answers] == [
        ("ap1", "alice", True, "erp.create_purchase_order")
    ]

    board.add(_event(ApprovalAnswer(approval_id="ap3", approved=False, by="bob"), workflow="w3"))
    board.add(_request("w4", "ap4", amount=9000.0, ts=1002.0))
    board.add(_done("w4", "halted"))
    snap = board.snapshot(1010.0)
    assert snap.pending == []
    assert [(a.by, a.approved) for a in snap.answers] == [("bob", False), ("alice", True)]


def test_board_sums_cost_per_workflow_in_flight_and_tokens_of_the_last_minute() -> None:
    board = WatchBoard(top=2)
    for event in [
        _event(WorkflowStart(item="laptops", vendor="V", amount_usd=1.0), workflow="w1"),
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

    board.add(_done("w2", "executed"))
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
        board.add(_event(WorkflowStart(item="x", vendor="V", amount_usd=1.0), workflow=workflow))
    for event in [_done("w1", "executed"), _done("w2", "halted"), _done("w2", "halted")]:
        board.add(event)
    snap = board.snapshot(0.0)
    assert (snap.started, snap.in_flight) == (3, 1)
    assert snap.finished == {"executed": 1, "halted": 1}
    assert [(e.kind, e.workflow) for e in snap.tail] == [
        ("WorkflowDone", "w1"),
        ("WorkflowDone", "w2"),
        ("WorkflowDone", "w2"),
    ]


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
    assert "wf-[red]x[/]" in text and "$7,250.00" in text and "1.0m" in text
    assert "bad_signature" in text and "mallory" in text


def test_summaries_read_nested_fields_and_skip_what_is_not_a_mapping() -> None:
    request = _request("w1", "ap1", amount=7000.0, ts=1.0).summary
    assert (request["amount_usd"], request["vendor"]) == (7000.0, "Vendor_A")
    odd = msgspec.msgpack.encode({"type": "ApprovalRequest", "approval_id": "a", "args": [1]})
    assert summarize_body("ApprovalRequest", odd) == {"approval_id": "a"}
    done = _done("w1", "rejected").summary
    assert done == {"result": "rejected", "model_calls": 2}

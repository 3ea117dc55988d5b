"""``govmesh watch``: a running deployment's events as they happen, from another terminal.

The watcher reads the deployment's verified events through the public `EventStream`, from
now on or, to join late, from the stream's start: any agent may publish a forged or
malformed message that the stream keeps for days, and watch shows each one the stream
refuses as a security event and goes on.

`WatchBoard` folds the events into what the live dashboard shows (decisions by outcome,
pending approvals, burn, security events, workflows); it is plain Python, without a clock,
a terminal or a bus.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Final

import msgspec

from govmesh.observability._audit import Scalar, answers_starter, declared_fields
from govmesh.observability._events import Event
from govmesh.observability._stored import RefusedMessage
from govmesh.runtime import WATCH_MEMBER

__all__ = [
    "AnswerSeen",
    "BoardSnapshot",
    "PendingApproval",
    "SecurityCount",
    "WatchBoard",
    "WatchedEvent",
    "WorkflowSpend",
]

_RATE_WINDOW_S: Final = 60.0
# Asked about once a second by whoever shows burn; the tail would show nothing else.
_POLLING: Final = frozenset({"BudgetQuery", "SnapshotQuery"})
_DETAIL_CHARS: Final = 120


class WatchedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event of the stream, as the watcher shows it.

    Attributes:
        summary: a few fields of the body (`summarize_body`); reasoning only as a hash.
        refused: the message failed verification: ``kind`` is ``SecurityEvent``, the
            summary says why (``reason``, ``detail``) and what it claimed
            (``claimed_sender``, ``claimed_kind``, ``stream_seq``); ``workflow`` and ``id``
            are only claims.
    """

    ts: float
    workflow: str
    kind: str
    sender: str
    subject: str
    id: str
    causation: str
    summary: dict[str, Any]
    refused: bool = False

    @classmethod
    def of(cls, checked: Event | RefusedMessage) -> WatchedEvent:
        """A verified event as watch shows it, or a refused message as a security event."""
        if isinstance(checked, RefusedMessage):
            return cls(
                ts=checked.stored_at,
                workflow=checked.workflow,
                kind="SecurityEvent",
                sender=WATCH_MEMBER,
                subject=checked.subject,
                id=checked.id,
                causation="",
                summary={
                    "reason": checked.reason,
                    "claimed_sender": checked.claimed_sender,
                    "claimed_kind": checked.kind,
                    "stream_seq": checked.seq,
                    "detail": checked.detail[:_DETAIL_CHARS],
                },
                refused=True,
            )
        return cls(
            ts=checked.ts,
            workflow=checked.workflow,
            kind=checked.kind,
            sender=checked.sender,
            subject=checked.subject,
            id=checked.id,
            causation=checked.causation,
            summary=checked.summary(),
        )


class PendingApproval(msgspec.Struct, frozen=True, kw_only=True):
    """An approval request seen on the stream and not answered yet.

    Attributes:
        shown: the arguments its tool declares to show, by name (every argument for a
            request from before tools declared them; see `declared_fields`).
        requested_at: when the request was sent.
    """

    approval_id: str
    workflow: str
    tool: str
    escalation: str = ""
    shown: dict[str, Scalar] = {}
    requested_at: float


class AnswerSeen(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's answer to an approval request.

    Attributes:
        tool: the tool the request asked for, when the request was seen too.
    """

    approval_id: str
    workflow: str
    tool: str = ""
    by: str
    approved: bool
    ts: float


class WorkflowSpend(msgspec.Struct, frozen=True, kw_only=True):
    """Model use so far of one workflow in flight.

    Attributes:
        tokens: input plus output tokens.
        cost_usd: the calls' cost at the agents' prices.
        tokens_last_min: tokens of its calls in the minute up to the snapshot.
    """

    workflow: str
    calls: int
    tokens: int
    cost_usd: float
    tokens_last_min: int


class SecurityCount(msgspec.Struct, frozen=True, kw_only=True):
    """How many messages receivers refused for one reason from one claimed sender.

    Attributes:
        sender: the sender the refused messages claimed (``"?"`` when unreadable).
    """

    reason: str
    sender: str
    count: int


class BoardSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What `WatchBoard` has folded so far, at one moment.

    Attributes:
        at: the moment (Unix time) ages and the last minute are measured from.
        events: events seen.
        decisions: governance's decisions by outcome (``allow``, ``deny``, ``escalate``),
            not counting the final decisions that settle an escalation.
        settled: final decisions that settled an escalation (approved, denied or expired),
            by outcome.
        policy_hashes: decisions per hash of the policy set they were made under.
        pending: approval requests not answered yet, oldest first.
        answers: the latest answers, newest first.
        spend: the costliest workflows in flight, costliest first.
        calls, tokens, cost_usd: model use of every workflow seen, finished or not.
        tokens_last_min: tokens of the calls in the minute up to ``at``.
        security: refused messages per reason and claimed sender, most first: those
            receivers reported (``SecurityEvent`` s on the stream) and those watch itself
            refused on the stream (a message refused by both counts in both).
        refused: messages on the stream that watch refused (forged, replayed, malformed).
        started: workflows seen starting.
        in_flight: workflows seen and not finished.
        finished: finished workflows by result (``completed``, ``denied``, ``rejected``,
            ``failed``, ``halted``): each counted when its entry agent's `Outcome` reaches
            whoever started it.
        tail: the latest events, oldest first, apart from polling queries.
    """

    at: float
    events: int
    decisions: dict[str, int]
    settled: dict[str, int]
    policy_hashes: dict[str, int]
    pending: list[PendingApproval]
    answers: list[AnswerSeen]
    spend: list[WorkflowSpend]
    calls: int
    tokens: int
    cost_usd: float
    tokens_last_min: int
    security: list[SecurityCount]
    refused: int
    started: int
    in_flight: int
    finished: dict[str, int]
    tail: list[WatchedEvent]


class _Flow(msgspec.Struct, kw_only=True):
    """What the board keeps of one workflow in flight (or, for `WatchBoard`'s total, of all).

    Attributes:
        starter: who started it: the sender of its start record, or of its first
            `WorkflowStart` (see `answers_starter`).
        decided: (intent hash, settles an escalation) of each decision counted: an agent
            that asks again gets the same decision again, which is not a new one.
        settled: approvals answered or decided, so a repeated request does not reopen one.
    """

    started: bool = False
    starter: str = ""
    calls: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    decided: set[tuple[str, bool]] = msgspec.field(default_factory=set)
    settled: set[str] = msgspec.field(default_factory=set)


class WatchBoard:
    """The figures `govmesh watch` shows, folded from the events one at a time.

    Pure: it keeps no clock of its own; `snapshot` is told the time. Repeats on the stream
    (an agent asking again for a decision it did not get, a coordinator starting a workflow
    again after a restart) are counted once. A workflow ends with the `Outcome` its entry
    agent sends whoever started it; outcomes one agent sends another that asked it to take
    part do not end it. Memory stays bounded by what is in flight, except one id per
    finished workflow and one per coordinator, so that late events do not count it again.

    Args:
        tail: events kept for the tail.
        answers: answers kept.
        top: workflows in `BoardSnapshot.spend`.
    """

    def __init__(self, *, tail: int = 15, answers: int = 8, top: int = 8) -> None:
        self._top = top
        self._events = 0
        self._tail: deque[WatchedEvent] = deque(maxlen=tail)
        self._decisions: Counter[str] = Counter()
        self._settled: Counter[str] = Counter()
        self._policies: Counter[str] = Counter()
        self._pending: dict[str, PendingApproval] = {}
        self._answers: deque[AnswerSeen] = deque(maxlen=answers)
        self._total = _Flow()
        self._recent: deque[tuple[float, str, int]] = deque()
        self._security: Counter[tuple[str, str]] = Counter()
        self._refused = 0
        self._started = 0
        self._flows: dict[str, _Flow] = {}
        self._coordinators: set[str] = set()
        self._done: set[str] = set()
        self._finished: Counter[str] = Counter()

    def add(self, event: WatchedEvent) -> None:
        """Fold one event in."""
        self._events += 1
        if event.kind not in _POLLING:
            self._tail.append(event)
        s, workflow = event.summary, event.workflow
        if event.refused:
            # What a refused message claims (its workflow above all) is not believed.
            self._refused += 1
            self._security[(_text(s, "reason") or "?", _text(s, "claimed_sender") or "?")] += 1
            return
        flow = self._flows.get(workflow)
        if flow is None:
            flow = _Flow()
            # No workflow, or one that finished: counted in the totals only.
            if workflow and workflow not in self._done:
                self._flows[workflow] = flow
        match event.kind:
            case "Decision":
                self._decision(flow, s)
            case "ApprovalRequest":
                approval_id = _text(s, "approval_id")
                if approval_id and approval_id not in flow.settled | self._pending.keys():
                    self._pending[approval_id] = PendingApproval(
                        approval_id=approval_id,
                        workflow=workflow,
                        tool=_text(s, "tool"),
                        escalation=_text(s, "escalation"),
                        shown=declared_fields(event.kind, s),
                        requested_at=event.ts,
                    )
            case "ApprovalAnswer":
                approval_id = _text(s, "approval_id")
                flow.settled.add(approval_id)
                request = self._pending.pop(approval_id, None)
                self._answers.appendleft(
                    AnswerSeen(
                        approval_id=approval_id,
                        workflow=workflow,
                        tool="" if request is None else request.tool,
                        by=_text(s, "by"),
                        approved=s.get("approved") is True,
                        ts=event.ts,
                    )
                )
            case "Usage":
                tokens = int(_number(s, "input_tokens") or 0) + int(
                    _number(s, "output_tokens") or 0
                )
                cost = _number(s, "cost_usd") or 0.0
                for counted in (flow, self._total):
                    counted.calls += 1
                    counted.tokens += tokens
                    counted.cost_usd += cost
                self._recent.append((event.ts, workflow, tokens))
                self._forget_before(event.ts - _RATE_WINDOW_S)
            case "SecurityEvent":
                self._security[(_text(s, "reason") or "?", _text(s, "claimed_sender") or "?")] += 1
            case "StartRecord":
                self._coordinators.add(event.sender)
                flow.starter = flow.starter or event.sender
            case "WorkflowStart" if not flow.started:
                flow.started = True
                flow.starter = flow.starter or event.sender
                self._started += 1
            case "Outcome" if workflow in self._flows and self._ends(flow, event):
                self._finished[_text(s, "result") or "?"] += 1
                del self._flows[workflow]
                self._done.add(workflow)
                for approval_id in [
                    a.approval_id for a in self._pending.values() if a.workflow == workflow
                ]:
                    del self._pending[approval_id]

    def _ends(self, flow: _Flow, event: WatchedEvent) -> bool:
        """Whether ``event`` (an `Outcome`) ends its workflow. For a workflow whose start
        came before the watch joined, an outcome to any coordinator seen (a sender of start
        records) ends it."""
        if flow.starter:
            return answers_starter(event.kind, event.subject, flow.starter)
        return any(answers_starter(event.kind, event.subject, c) for c in self._coordinators)

    def _decision(self, flow: _Flow, s: dict[str, Any]) -> None:
        approval_id = _text(s, "approval_id")
        settles = bool(approval_id) and s.get("final") is True
        key = (_text(s, "intent_hash"), settles)
        if key[0] and key in flow.decided:
            return
        flow.decided.add(key)
        outcome = _text(s, "outcome") or "?"
        if settles:
            self._settled[outcome] += 1
            flow.settled.add(approval_id)
            self._pending.pop(approval_id, None)
        else:
            self._decisions[outcome] += 1
        policy = _text(s, "policy_hash")
        if policy:
            self._policies[policy] += 1

    def snapshot(self, now: float) -> BoardSnapshot:
        """The figures as of ``now`` (Unix time), which ages and the last minute end at."""
        self._forget_before(now - _RATE_WINDOW_S)
        last_min: Counter[str] = Counter()
        for _, workflow, tokens in self._recent:
            last_min[workflow] += tokens
        spending = [(w, f) for w, f in self._flows.items() if f.calls]
        spending.sort(key=lambda item: item[1].cost_usd, reverse=True)
        return BoardSnapshot(
            at=now,
            events=self._events,
            decisions=dict(self._decisions),
            settled=dict(self._settled),
            policy_hashes=dict(self._policies.most_common()),
            pending=sorted(self._pending.values(), key=lambda a: a.requested_at),
            answers=list(self._answers),
            spend=[
                WorkflowSpend(
                    workflow=workflow,
                    calls=flow.calls,
                    tokens=flow.tokens,
                    cost_usd=flow.cost_usd,
                    tokens_last_min=last_min[workflow],
                )
                for workflow, flow in spending[: self._top]
            ],
            calls=self._total.calls,
            tokens=self._total.tokens,
            cost_usd=self._total.cost_usd,
            tokens_last_min=sum(last_min.values()),
            security=[
                SecurityCount(reason=reason, sender=sender, count=n)
                for (reason, sender), n in self._security.most_common()
            ],
            refused=self._refused,
            started=self._started,
            in_flight=len(self._flows),
            finished=dict(self._finished),
            tail=list(self._tail),
        )

    def _forget_before(self, cutoff: float) -> None:
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()


def _text(summary: dict[str, Any], name: str) -> str:
    value = summary.get(name)
    return value if isinstance(value, str) else ""


def _number(summary: dict[str, Any], name: str) -> float | None:
    value = summary.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)

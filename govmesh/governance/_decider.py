"""Deciding intents in groups: one Redis round trip checks, commits and records the decisions
on every intent that arrived while the previous round trip was in the air.

Governance evaluates each intent on the figures it assumes (`_Assumed`: what it last saw or
committed) and sends the decisions with those assumptions; one script (`_DECIDE`) compares
each assumption with the true figure and commits only the decisions whose figures held. A
decision whose figures had moved is evaluated again on the true ones, which the script sends
back, and goes out with the next group. Only the figures some policy of the role looks at
are assumed and compared (`PolicySet.figures`), so decisions that no limit ties together
never make each other decide again; the others are not read at all, and the record names
them (`DecisionRecord.unused`).

One round trip for many decisions matters more than anything the server does: a round trip
costs the client far more CPU than the script costs the server. For the same reason the
round trips go over a `RespConnection` of their own, not redis-py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Final, Generic, NamedTuple, TypeVar

import msgspec

from govmesh.config import utc_day
from govmesh.errors import SecurityError
from govmesh.governance._evaluator import (
    EvalContext,
    Intent,
    Verdict,
    evaluate,
    intent_hash,
    spend_of,
)
from govmesh.governance._policy import Figures, PolicySet
from govmesh.governance._replay import (
    CONTENDED_REASON,
    DecisionRecord,
    PolicySource,
    decisions_key,
    policy_key,
)
from govmesh.governance._starts import start_key
from govmesh.governance._terms import ToolTerms
from govmesh.governance.messages import ApprovalRequest, Outcome
from govmesh.runtime._resp import RespConnection

__all__ = ["Decided", "Decider", "FirstDecision", "Fresh", "Seal", "nonce_key"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS: Final = 20
"""Evaluations of one intent before governance gives up under contention and denies."""

_GROUP: Final = 128
"""The most decisions sent in one round trip."""

# How long governance remembers its first decision on an intent: longer than the longest
# workflow waits (7 days) between a step and its retry. One escalated with an approval that
# never lapses is remembered for as long as the approval stays pending, and beyond.
_FIRST_DECISION_TTL_S: Final = 8 * 86_400

# A day's spend expires a day after its UTC day ends, when no decision can read it any more.
_DAY_SPEND_TTL_S: Final = 2 * 86_400

# Decisions on a group of intents, in one atomic step. KEYS[1..4] are shared: the committed
# spend per workflow, the decision records, the pending approvals and their expiry times.
# ARGV[1] is the number of intents; each then has 6 keys (its day's spend, its agent's
# calls, its policy version's texts, its first decision, its workflow's start record, its
# message's nonce) and 23 arguments:
#   1 workflow   2 agent   3 rate window start or ''   4 now   5 intent id
#   6 calls ttl  7, 8, 9 the workflow spend, day spend and recent calls it was decided on,
#   or '' for a figure it does not depend on   10 the amount to commit or ''
#   11 day spend ttl   12 the policy texts of a version not stored yet, or ''
#   13 the decision record or ''   14, 15, 16 an escalation's approval id, request and expiry
#   17 the first decision to keep, or ''   18 how long to keep it, or '' for good
#   19 the agent's budget authority, or '' when none applies   20 the intent's amount
#   21 '1' if it was decided as over that authority, '0' if within
#   22 the standing it was decided on (2: the workflow's start record names the agent,
#   1: it names others, 0: there is none), or '' when not checked
#   23 how long to remember the nonce (ms), or '' when it was claimed already
# For each intent, in order:
# - a message whose nonce was seen before (by any actor of the group) writes nothing, and
#   the reply is 0;
# - an intent decided before (its first decision is kept) gets that first decision back, and
#   nothing is counted or written: a retry, or a retry racing its original, never commits
#   twice;
# - with a rate window, the call is counted for the calls after it, by its id, so an intent
#   decided again is counted once, and the calls in the window before it are what it saw;
# - a figure it depends on that is not what it was decided on, a day spend now on the other
#   side of the budget authority, or another standing, writes nothing, and the reply is
#   {0, workflow spend, day spend, recent calls, standing} to decide again on;
# - otherwise, each only if given: the amount is committed, the policy texts stored (before
#   the record that refers to them), the record appended, an escalation's approval request
#   stored as pending, and the first decision kept; the reply is {1, figures as they now are}.
# The budget authority compares sides, not figures: what another actor commits meanwhile
# makes a decision again only when it crosses the authority, so decisions of one agent on
# several actors do not keep making each other decide again.
_DECIDE: Final = """
local n = tonumber(ARGV[1])
local out = {}
for i = 0, n - 1 do
  local k = 4 + i * 6
  local a = 1 + i * 23
  if ARGV[a + 23] ~= '' and not redis.call('SET', KEYS[k + 6], '1', 'NX', 'PX', ARGV[a + 23]) then
    out[i + 1] = 0
  else
    local first = false
    if ARGV[a + 17] ~= '' then
      first = redis.call('GET', KEYS[k + 4])
    end
    if first then
      out[i + 1] = first
    else
      local wf = ARGV[a + 7] ~= '' and (redis.call('HGET', KEYS[1], ARGV[a + 1]) or '0') or '0'
      local day = '0'
      if ARGV[a + 8] ~= '' or ARGV[a + 19] ~= '' then
        day = redis.call('HGET', KEYS[k + 1], ARGV[a + 2]) or '0'
      end
      local recent = 0
      if ARGV[a + 3] ~= '' then
        redis.call('ZREMRANGEBYSCORE', KEYS[k + 2], '-inf', ARGV[a + 3])
        local own = redis.call('ZSCORE', KEYS[k + 2], ARGV[a + 5])
        recent = redis.call('ZCARD', KEYS[k + 2]) - (own and 1 or 0)
        redis.call('ZADD', KEYS[k + 2], ARGV[a + 4], ARGV[a + 5])
        redis.call('EXPIRE', KEYS[k + 2], ARGV[a + 6])
      end
      local standing = 2
      if ARGV[a + 22] ~= '' then
        if redis.call('HEXISTS', KEYS[k + 5], ARGV[a + 2]) == 1 then
          standing = 2
        elseif redis.call('EXISTS', KEYS[k + 5]) == 1 then
          standing = 1
        else
          standing = 0
        end
      end
      if (ARGV[a + 7] ~= '' and tonumber(wf) ~= tonumber(ARGV[a + 7]))
          or (ARGV[a + 8] ~= '' and tonumber(day) ~= tonumber(ARGV[a + 8]))
          or (ARGV[a + 9] ~= '' and recent ~= tonumber(ARGV[a + 9]))
          or (ARGV[a + 19] ~= '' and (tonumber(ARGV[a + 20]) + tonumber(day)
              > tonumber(ARGV[a + 19])) ~= (ARGV[a + 21] == '1'))
          or (ARGV[a + 22] ~= '' and standing ~= tonumber(ARGV[a + 22])) then
        out[i + 1] = {0, wf, day, recent, standing}
      else
        if ARGV[a + 10] ~= '' then
          wf = redis.call('HINCRBYFLOAT', KEYS[1], ARGV[a + 1], ARGV[a + 10])
          day = redis.call('HINCRBYFLOAT', KEYS[k + 1], ARGV[a + 2], ARGV[a + 10])
          redis.call('EXPIRE', KEYS[k + 1], ARGV[a + 11])
        end
        if ARGV[a + 12] ~= '' then
          redis.call('SET', KEYS[k + 3], ARGV[a + 12], 'NX')
        end
        if ARGV[a + 13] ~= '' then
          redis.call('XADD', KEYS[2], '*', 'record', ARGV[a + 13])
        end
        if ARGV[a + 14] ~= '' then
          redis.call('HSET', KEYS[3], ARGV[a + 14], ARGV[a + 15])
          if ARGV[a + 16] ~= '' then
            redis.call('ZADD', KEYS[4], ARGV[a + 16], ARGV[a + 14])
          end
        end
        if ARGV[a + 17] ~= '' then
          if ARGV[a + 18] ~= '' then
            redis.call('SET', KEYS[k + 4], ARGV[a + 17], 'EX', ARGV[a + 18])
          else
            redis.call('SET', KEYS[k + 4], ARGV[a + 17])
          end
        end
        out[i + 1] = {1, wf, day, recent, standing}
      end
    end
  end
end
return out
"""


class FirstDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Governance's first decision on an intent (workflow, step, intent hash), kept so that
    the same intent asked again (an agent resuming after a crash, or retrying after a lost
    reply) gets the same answer, and its spend is never committed twice.

    Attributes:
        intent_id: the intent message that was decided.
        approval_id: an escalation's approval; its settlement is the decision that stands.
    """

    intent_id: str
    outcome: Outcome
    reasons: tuple[str, ...]
    obligations: tuple[str, ...]
    policy_hash: str
    approval_id: str = ""
    approval_expires_at: float = 0.0


class Fresh(NamedTuple):
    """A decision made and written now."""

    verdict: Verdict
    request: ApprovalRequest | None
    """For a recorded escalation, the approval request now pending."""
    sealed: Any = None
    """What `Decider.decide`'s ``seal`` made of this decision while it was being written."""


Decided = Fresh | FirstDecision
"""A decision made and written now; or the first decision on an intent decided before, and
nothing was committed or recorded."""

Seal = Callable[[Verdict, ApprovalRequest | None], Any]

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")

# Far more than the workflows and agents one actor decides for at a time; a figure forgotten
# costs a decision on it one more round trip, nothing else.
_ASSUMED_KEPT: Final = 4096


class _Assumed(Generic[_K, _V]):
    """The figures governance last saw or committed, by key, at most ``_ASSUMED_KEPT`` of
    them (the least recently stored go first). Only a guess to decide on: the script compares
    it with the true figure."""

    def __init__(self) -> None:
        self._kept: dict[_K, _V] = {}

    def get(self, key: _K, default: _V) -> _V:
        return self._kept.get(key, default)

    def forget(self, key: _K) -> None:
        self._kept.pop(key, None)

    def put(self, key: _K, value: _V) -> None:
        kept = self._kept
        kept.pop(key, None)
        kept[key] = value
        if len(kept) > _ASSUMED_KEPT:
            del kept[next(iter(kept))]


def shown_args(args: dict[str, Any], terms: ToolTerms | None) -> dict[str, Any]:
    """The arguments people see of a call with ``args``: those its tool declares to show
    that the call gives, or every argument when the tool declares none."""
    if terms is None or not terms.show:
        return dict(args)
    return {name: args[name] for name in terms.show if name in args}


def first_decision(
    call_id: str, verdict: Verdict, request: ApprovalRequest | None
) -> FirstDecision:
    """The first decision to keep for a verdict on the intent ``call_id``."""
    return FirstDecision(
        intent_id=call_id,
        outcome=verdict.outcome,
        reasons=verdict.reasons,
        obligations=verdict.obligations,
        policy_hash=verdict.policy_hash,
        approval_id="" if request is None else request.approval_id,
        approval_expires_at=0.0 if request is None else request.expires_at,
    )


def approval_request(
    intent: Intent,
    verdict: Verdict,
    *,
    reflections: int,
    intent_id: str,
    trace: str,
    authority: float | None,
    terms: ToolTerms | None = None,
) -> ApprovalRequest:
    """The approval request an escalation of ``intent`` puts to its escalation target,
    showing the arguments its tool's ``terms`` declare to show."""
    now = time.time()
    return ApprovalRequest(
        approval_id=uuid.uuid4().hex,
        workflow=intent.workflow,
        agent=intent.agent,
        tool=intent.tool,
        args=intent.args,
        intent_id=intent_id,
        intent_hash=intent_hash(intent),
        reasons=verdict.reasons,
        escalation=verdict.escalation or "human_review",
        policy_hash=verdict.policy_hash,
        requested_at=now,
        role=intent.role,
        step=intent.step,
        reflections=reflections,
        expires_at=now + verdict.approval_expiry_s if verdict.approval_expiry_s else 0.0,
        on_expiry=verdict.on_expiry,
        trace=trace,
        budget_authority_usd=authority,
        shown=shown_args(intent.args, terms),
    )


@dataclasses.dataclass(slots=True)
class _Job:
    """One intent waiting for its decision (see `Decider.decide` for the fields)."""

    intent: Intent
    reflections: int
    now: float
    call_id: str
    commit: tuple[str, ...]
    first_key: str
    record: bool
    trace: str
    seal: Seal | None
    future: asyncio.Future[Decided]
    authority: float | None
    check_start: bool
    nonce: bytes
    """The intent message's nonce, until the script has claimed it for this decision."""
    attempts: int = 0
    seen: tuple[float, float, int, int] | None = None
    """The true figures and standing the script sent back when the last attempt's had
    moved."""


@dataclasses.dataclass(slots=True)
class _Sent:
    """What one job's decision in a group was made on, and the policy version whose texts it
    stores ("" for none)."""

    job: _Job
    verdict: Verdict
    request: ApprovalRequest | None
    figures: Figures
    texts_of: str
    sealed: Any = None


class _Running:
    """Figures as a group's decisions so far leave them if they are written, so that the
    decisions of one group on one workflow or agent need not make each other decide again."""

    __slots__ = ("calls", "day_spend", "spend")

    def __init__(self) -> None:
        self.spend: dict[str, float] = {}
        self.day_spend: dict[tuple[str, str], float] = {}
        self.calls: dict[str, int] = {}


class Decider:
    """Decides intents on assumed figures and commits them in groups (see the module).

    Args:
        redis: a connection of its own to the tenant's Redis.
        prefix: the tenant's key prefix.
        member: the deciding actor's id, named in every record.
        policies: the policy texts and the set in force now; asked once per group, so one
            group is decided under one version even across a reload.
        key: builds a key under the tenant's prefix.
        approval_keys: the pending approvals hash and their expiry sorted set.
        nonce_ttl_s: how long a nonce claimed for a decision is remembered: as long as a
            message carrying it could pass the freshness check.
        terms: the tools' declared terms, by tool name: which arguments of a call are spend,
            and which an approval request shows. A tool without terms spends nothing.
    """

    def __init__(
        self,
        redis: RespConnection,
        *,
        prefix: str,
        member: str,
        policies: Callable[[], tuple[list[PolicySource], PolicySet]],
        key: Callable[..., str],
        approval_keys: tuple[str, str],
        nonce_ttl_s: float,
        terms: Mapping[str, ToolTerms] | None = None,
    ) -> None:
        self._script = redis.script(_DECIDE)
        self._terms: Mapping[str, ToolTerms] = terms or {}
        self._prefix = prefix
        self._member = member
        self._policies = policies
        self._key = key
        self._shared_keys = [key("spend"), decisions_key(prefix), *approval_keys]
        self._encode = msgspec.msgpack.Encoder().encode
        self._first = msgspec.msgpack.Decoder(FirstDecision)
        self._recorded_versions: set[str] = set()
        self._workflow_spend: _Assumed[str, float] = _Assumed()
        self._day_spend: _Assumed[tuple[str, str], float] = _Assumed()
        self._recent_calls: _Assumed[str, int] = _Assumed()
        self._standing: _Assumed[tuple[str, str], int] = _Assumed()
        self._nonce_ttl_ms = int(nonce_ttl_s * 1000) + 1
        self._queue: list[_Job] = []
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.round_trips = 0
        self.attempts = 0

    async def decide(
        self,
        intent: Intent,
        reflections: int,
        now: float,
        *,
        call_id: str,
        commit: tuple[str, ...],
        first_key: str = "",
        record: bool = True,
        trace: str = "",
        seal: Seal | None = None,
        authority: float | None = None,
        check_start: bool = False,
        nonce: bytes = b"",
    ) -> Decided:
        """Decide ``intent`` on figures that hold when the decision is written, and write it
        in one atomic step with the decisions of its group.

        Args:
            intent: the intent to decide.
            reflections: the agent's reflection count, part of the figures.
            now: the decision time.
            call_id: the intent's id; counts the call for the rate limit and names the record.
            commit: the outcomes whose amount is committed to the spend.
            first_key: keep the decision under this key, and answer with what is kept there
                if something is (a `FirstDecision`, nothing committed or written); empty to
                keep nothing.
            record: with ``first_key``, also append the decision record and store an
                escalation's approval request: an intent's first decision. Without, only the
                outcome is kept (an approved escalation decided again once per approval).
            trace: the workflow's trace context, kept with an approval request.
            seal: called with the verdict and approval request while the decision is being
                written, so work that only the outcome waits for (signing the answer) is not
                left until after the round trip; its result is `Fresh.sealed`, and it is
                thrown away when the decision is not the one written. It may run in the task
                of another intent of the group, so it must not read the caller's context (its
                span, say). An error in it is logged and leaves `Fresh.sealed` None.
            authority: the agent's budget authority per UTC day, checked against what was
                committed for it today with this intent's amount; None checks none.
            check_start: decide on whether a start record names the workflow and the agent
                (`start_key`); unchecked, both are taken as given.
            nonce: the intent message's nonce, claimed for the governance actors of the
                tenant in the same step; empty claims none.

        Raises:
            RedisError: the group's round trip failed; nothing of this decision was written.
            SecurityError: ``replay``: another decision claimed ``nonce`` first; nothing of
                this one was written.
        """
        if self._closed:
            raise RuntimeError(f"{self._member} is closing")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decided] = loop.create_future()
        self._queue.append(
            _Job(
                intent=intent,
                reflections=reflections,
                now=now,
                call_id=call_id,
                commit=commit,
                first_key=first_key,
                record=record,
                trace=trace,
                seal=seal,
                future=future,
                authority=authority,
                check_start=check_start,
                nonce=nonce,
            )
        )
        if not self._busy:
            # Nobody is deciding: this caller sends the group itself, with no task switch on
            # the way, and a task sends whatever queues up meanwhile.
            self._busy = True
            try:
                await self._send_next()
            finally:
                self._carry_on()
        return await future

    async def close(self) -> None:
        """Stop deciding; decisions still waiting are cancelled. Safe to call twice."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for job in self._queue:
            job.future.cancel()
        self._queue = []

    @staticmethod
    def _fail(jobs: list[_Job], exc: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

    def _carry_on(self) -> None:
        """After a group: a task sends what queued up while it was in the air, if anything."""
        if self._queue and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name=f"decide-{self._member}"
            )
        else:
            self._busy = False

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._send_next()
        finally:
            self._busy = False

    async def _send_next(self) -> None:
        """Decide and write the next group; its jobs whose figures had moved go first in
        the queue again (they have waited longest), a failed round trip fails them all."""
        group, self._queue = self._queue[:_GROUP], self._queue[_GROUP:]
        try:
            again = await self._decide_group(group)
        except asyncio.CancelledError:
            # Only when closing: the group's script may have run, so deciding its other
            # jobs again could commit twice; their agents ask again.
            for job in group:
                job.future.cancel()
            raise
        except Exception as exc:
            self._fail(group, exc)
            return
        self._queue[:0] = again

    async def _decide_group(self, group: list[_Job]) -> list[_Job]:
        """Decide and write one group; returns the jobs whose figures had moved."""
        sources, policies = self._policies()
        keys: list[Any] = list(self._shared_keys)
        args: list[Any] = [len(group)]
        sent: list[_Sent] = []
        running = _Running()
        for job in group:
            item = self._prepare(job, sources, policies, running, keys, args)
            sent.append(item)
        self.round_trips += 1
        self.attempts += len(group)
        sending = self._script.send(keys=keys, args=args)
        for item in sent:
            job = item.job
            if job.seal is not None and not job.future.done():
                try:
                    item.sealed = job.seal(item.verdict, item.request)
                except Exception:
                    log.exception("sealing the decision on %s failed", job.call_id)
        replies = await sending
        again: list[_Job] = []
        for item, reply in zip(sent, replies, strict=True):
            job = item.job
            if isinstance(reply, int):
                if not job.future.done():  # not if its handler was cancelled meanwhile
                    job.future.set_exception(
                        SecurityError("replay", f"nonce {job.nonce.hex()} seen before")
                    )
                continue
            job.nonce = b""  # claimed for this decision: deciding it again claims no more
            if isinstance(reply, bytes):
                if not job.future.done():
                    job.future.set_result(self._first.decode(reply))
                continue
            status, wf_text, day_text, recent, standing = reply
            figures = (float(wf_text), float(day_text), int(recent), int(standing))
            self._assume(job, utc_day(job.now), item.figures, figures)
            if status == 1:
                if item.texts_of:
                    self._recorded_versions.add(item.texts_of)
                if not job.future.done():
                    job.future.set_result(Fresh(item.verdict, item.request, item.sealed))
            else:
                job.attempts += 1
                job.seen = figures
                again.append(job)
        return again

    def _assumed(
        self,
        job: _Job,
        needs: Figures,
        bounded: bool,
        day: str,
        running: _Running,
        spend_args: tuple[str, ...],
    ) -> EvalContext:
        """The figures to decide ``job`` on: as the group's earlier decisions leave them,
        else as the script last sent them back for this job, else as last seen."""
        intent, seen = job.intent, job.seen
        wf = day_spent = 0.0
        recent = 0
        if needs.workflow_spend:
            found = running.spend.get(intent.workflow)
            if found is None:
                found = seen[0] if seen else self._workflow_spend.get(intent.workflow, 0.0)
            wf = found
        if needs.day_spend or bounded:
            found = running.day_spend.get((intent.agent, day))
            if found is None:
                found = seen[1] if seen else self._day_spend.get((intent.agent, day), 0.0)
            day_spent = found
        if needs.rate_window_s is not None:
            counted = running.calls.get(intent.agent)
            if counted is None:
                counted = seen[2] if seen else self._recent_calls.get(intent.agent, 0)
            recent = counted
        standing = _NAMED
        if job.check_start:
            # Taken as named until the script says otherwise: a start record, once written,
            # is never taken back, so only an intent outside one costs another round trip.
            standing = (
                seen[3] if seen else self._standing.get((intent.workflow, intent.agent), _NAMED)
            )
        return EvalContext(
            reflections=job.reflections,
            workflow_spend_usd=wf,
            now=job.now,
            day_spend_usd=day_spent,
            recent_calls=recent,
            workflow_started=standing != _UNSTARTED,
            agent_named=standing == _NAMED,
            budget_authority_usd=job.authority,
            spend_args=spend_args,
        )

    def _prepare(
        self,
        job: _Job,
        sources: list[PolicySource],
        policies: PolicySet,
        running: _Running,
        keys: list[Any],
        args: list[Any],
    ) -> _Sent:
        """Decide ``job`` on assumed figures and add its keys and arguments to the group."""
        intent = job.intent
        needs = policies.figures(intent.role)
        day = utc_day(job.now)
        terms = self._terms.get(intent.tool)
        # Recorded with the decision (in its context), so replay needs no tool's terms.
        spend_args = () if terms is None else terms.spend
        amount_asked = spend_of(intent.args, spend_args)
        # The budget authority reads the agent's spend today, compared by side only.
        bounded = job.authority is not None and amount_asked is not None
        ctx = self._assumed(job, needs, bounded, day, running, spend_args)
        contended = job.attempts >= MAX_ATTEMPTS
        verdict = (
            Verdict(
                outcome="deny",
                reasons=(CONTENDED_REASON,),
                obligations=(),
                policy_hash=policies.hash,
            )
            if contended
            else evaluate(policies, intent, ctx)
        )
        recorded = bool(job.first_key) and job.record
        request = (
            approval_request(
                intent,
                verdict,
                reflections=job.reflections,
                intent_id=job.call_id,
                trace=job.trace,
                authority=job.authority,
                terms=terms,
            )
            if recorded and verdict.outcome == "escalate"
            else None
        )
        amount = amount_asked if verdict.outcome in job.commit else None
        if amount is not None:
            running.spend[intent.workflow] = ctx.workflow_spend_usd + amount
            if needs.day_spend or bounded:
                running.day_spend[(intent.agent, day)] = ctx.day_spend_usd + amount
        window = needs.rate_window_s
        if window is not None:
            running.calls[intent.agent] = ctx.recent_calls + 1
        # Under contention the decision is written whatever the figures: it commits nothing,
        # and only a first decision already kept can stand in its way.
        compared = _NOTHING if contended else needs
        texts, record, kept = b"", b"", b""
        ttl: int | bytes = b""
        if job.first_key:
            first = first_decision(job.call_id, verdict, request)
            kept = self._encode(first)
            if not (first.approval_id and not first.approval_expires_at):
                # (An approval that never lapses keeps its first decision for good.)
                ttl = int(max(0.0, first.approval_expires_at - job.now)) + _FIRST_DECISION_TTL_S
        if recorded:
            if verdict.policy_hash not in self._recorded_versions:
                texts = msgspec.json.encode(sources)
            record = self._encode(
                DecisionRecord(
                    intent_id=job.call_id,
                    intent=intent,
                    context=ctx,
                    policy_hash=verdict.policy_hash,
                    outcome=verdict.outcome,
                    reasons=verdict.reasons,
                    decided_by=self._member,
                    contended=contended,
                    obligations=verdict.obligations,
                    unused=_unused(needs, bounded),
                )
            )
        keys += [
            self._key("day-spend", day),
            self._key("calls", intent.agent),
            policy_key(self._prefix, verdict.policy_hash),
            job.first_key or self._key("intent", ""),
            start_key(self._prefix, intent.workflow),
            nonce_key(self._prefix, job.nonce),
        ]
        args += [
            intent.workflow,
            intent.agent,
            b"" if window is None else job.now - window,
            job.now,
            job.call_id,
            0 if window is None else int(window) + 1,
            ctx.workflow_spend_usd if compared.workflow_spend else b"",
            ctx.day_spend_usd if compared.day_spend else b"",
            ctx.recent_calls if compared.rate_window_s is not None else b"",
            b"" if amount is None else amount,
            _DAY_SPEND_TTL_S,
            texts,
            record,
            b"" if request is None else request.approval_id,
            b"" if request is None else self._encode(request),
            request.expires_at if request is not None and request.expires_at else b"",
            kept,
            ttl,
            *_authority_args(
                job.authority, amount_asked, ctx.day_spend_usd, compared=bounded and not contended
            ),
            _standing(ctx) if job.check_start and not contended else b"",
            self._nonce_ttl_ms if job.nonce else b"",
        ]
        figures = _reading_day_spend(needs) if bounded and not contended else needs
        return _Sent(job, verdict, request, figures, verdict.policy_hash if texts else "")

    def _assume(
        self, job: _Job, day: str, needs: Figures, figures: tuple[float, float, int, int]
    ) -> None:
        """Remember the figures the script sent back, for the next decisions on them."""
        intent = job.intent
        if job.check_start:
            # Only a standing other than the one assumed is kept: most intents are in a
            # workflow that names their agent, and keeping those would push out the others.
            if figures[3] == _NAMED:
                self._standing.forget((intent.workflow, intent.agent))
            else:
                self._standing.put((intent.workflow, intent.agent), figures[3])
        if needs.workflow_spend:
            self._workflow_spend.put(intent.workflow, figures[0])
        if needs.day_spend:
            self._day_spend.put((intent.agent, day), figures[1])
        if needs.rate_window_s is not None:
            self._recent_calls.put(intent.agent, figures[2] + 1)


_NOTHING: Final = Figures(workflow_spend=False, day_spend=False, rate_window_s=None)

# A workflow's standing for one agent, as the script reports it.
_NAMED: Final = 2
_OTHERS_NAMED: Final = 1
_UNSTARTED: Final = 0


def nonce_key(prefix: str, nonce: bytes) -> str:
    """Where a message's nonce is remembered for every governance actor of a tenant."""
    return f"{prefix}:nonce:{nonce.hex()}"


def _authority_args(
    authority: float | None, amount: float | None, day_spent: float, *, compared: bool
) -> tuple[float | bytes, float | bytes, bytes]:
    """The script's arguments 19-21: the budget authority, the amount, and whether the
    decision took the amount as over it on the day's spend it assumed."""
    if not compared or authority is None or amount is None:
        return b"", b"", b""
    return authority, amount, b"1" if amount + day_spent > authority else b"0"


@functools.cache
def _reading_day_spend(needs: Figures) -> Figures:
    """``needs`` with the day's spend read and compared, as the budget authority needs it
    (one per role's figures, made once)."""
    return needs._replace(day_spend=True)


def _standing(ctx: EvalContext) -> int:
    if not ctx.workflow_started:
        return _UNSTARTED
    return _NAMED if ctx.agent_named else _OTHERS_NAMED


def _unused(needs: Figures, bounded: bool) -> tuple[str, ...]:
    return tuple(
        name
        for name, used in (
            ("workflow_spend_usd", needs.workflow_spend),
            ("day_spend_usd", needs.day_spend or bounded),
            ("recent_calls", needs.rate_window_s is not None),
        )
        if not used
    )

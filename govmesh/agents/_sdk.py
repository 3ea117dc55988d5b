"""The SDK for agents of one's own: an `Agent` class with `handler` methods, and the
`Workflow` each handler is given, whose primitives are governed and durable.

A handler runs inside an `AgentHost` actor. Every step it takes through its `Workflow` (a
model answer, a governed tool call, a durable timer, a request to another agent) is kept in
a journal saved with the workflow's snapshot before the handler goes on. When the agent's
process dies mid-workflow, the next one runs the handler again from its start, and every
finished step returns what it returned the first time, without a second model call or
effect; the first step not finished is taken up where it was (governance answers an intent
asked again with its decision, the gateway answers a step that ran with its recorded
result). So a handler must take the same steps in the same order when it runs again: it
decides only on what its steps return, `Workflow.now` and `Workflow.state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, Protocol, TypeVar, get_type_hints, overload

import msgspec

from govmesh.agents.messages import Outcome, WorkflowStart
from govmesh.bus import Delivery
from govmesh.errors import ConfigError, GovmeshError, StateError, ToolArgumentError
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.llm import Message, ModelRequest, ModelResponse, ToolDef
from govmesh.reservations import BudgetError
from govmesh.tools._spec import ToolSpec, standalone_schema
from govmesh.tools.messages import ToolResult

__all__ = [
    "Agent",
    "Denied",
    "Facts",
    "Halted",
    "Handler",
    "Journal",
    "Runtime",
    "ToolFailed",
    "TurnsExhausted",
    "Workflow",
    "handler",
    "kind_of",
]

A = TypeVar("A")
R = TypeVar("R")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_MARK: Final = "__govmesh_handler__"


class Denied(GovmeshError, PermissionError):
    """A governed call was not allowed: policy denied it, or the approver it was escalated
    to rejected it. Ends the workflow ``denied`` or ``rejected`` unless the handler catches
    it; nothing ran.

    Attributes:
        reasons: why, as governance (or the agent's own token) says.
        rejected: a person rejected it (an escalation); False for a policy denial.
        decision: governance's first answer: ``deny`` or ``escalate``; empty when the agent
            did not ask (the call is beyond what its own token allows).
        approval_id: the approval that was rejected, if any.
    """

    def __init__(
        self,
        reasons: tuple[str, ...],
        *,
        rejected: bool = False,
        decision: str = "",
        approval_id: str = "",
    ) -> None:
        self.reasons = reasons
        self.rejected = rejected
        self.decision = decision
        self.approval_id = approval_id
        what = "rejected" if rejected else "denied"
        super().__init__(f"{what}: {'; '.join(reasons) or 'no reason given'}")


class ToolFailed(GovmeshError, RuntimeError):
    """A tool ran under an allow and failed (see `govmesh.ToolError`); retryable failures
    were retried as the agent's `RetryPolicy` says before this is raised. Ends the workflow
    ``failed`` unless the handler catches it.

    Attributes:
        error: what went wrong, as the gateway reported it.
        retryable: the last failure was retryable (the retries ran out).
    """

    def __init__(self, error: str, *, retryable: bool = False) -> None:
        self.error = error
        self.retryable = retryable
        super().__init__(error)


class TurnsExhausted(GovmeshError, RuntimeError):
    """The model still asked for tools after the turns `Workflow.act` allows. Ends the
    workflow ``failed`` unless the handler catches it."""

    def __init__(self, key: str, turns: int) -> None:
        self.turns = turns
        super().__init__(f"{key}: the model still asked for tools after {turns} turns")


class Halted(GovmeshError, RuntimeError):
    """An agent this workflow asked (`Workflow.ask`) was halted: its model spend reached a
    cap, or a person stopped it at the soft threshold. Ends this workflow ``halted`` too
    unless the handler catches it.

    Attributes:
        reasons: why, as the asked agent says.
    """

    def __init__(self, reasons: tuple[str, ...]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(reasons) or "halted")


@overload
def handler(fn: F, /) -> F: ...
@overload
def handler(*, kind: str) -> Callable[[F], F]: ...
def handler(fn: F | None = None, /, *, kind: str | None = None) -> F | Callable[[F], F]:
    """Mark an async method ``(self, wf: Workflow, payload: SomeStruct) -> R | None`` of an
    `Agent` as the handler of workflows started with that payload type.

    The payload type's ``__qualname__`` is the handler's kind (`WorkflowStart.kind`), unless
    ``kind`` names another.
    """

    def mark(method: F) -> F:
        setattr(method, _MARK, kind)
        return method

    return mark if fn is None else mark(fn)


@dataclass(frozen=True, kw_only=True)
class Handler:
    """One handler of an agent class.

    Attributes:
        name: the method's name.
        kind: the start kind it handles.
        payload: its payload type.
    """

    name: str
    kind: str
    payload: type[Any]


def kind_of(payload_type: type[Any]) -> str:
    """The kind of a start whose payload is a ``payload_type`` (its ``__qualname__``)."""
    return payload_type.__qualname__


class Agent:
    """An agent of one's own. Subclass it, set `role` and `tools`, take options as keyword
    arguments of ``__init__``, and mark the methods that handle workflows with `handler`.

    Attributes:
        role: the agent's role, as policies name it; the class name by default, and a
            scenario may give another.
        tools: the tools it calls; its capabilities are their names by default.

    Raises:
        ConfigError: when the class is defined: a handler without type hints, with a
            payload that is not a class, or two handlers of one kind.
    """

    role: ClassVar[str] = ""
    tools: ClassVar[tuple[ToolSpec[Any, Any], ...]] = ()
    _handlers: ClassVar[dict[str, Handler]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.role:
            cls.role = cls.__name__
        found: dict[str, Handler] = {}
        for name, method in inspect.getmembers(cls, inspect.iscoroutinefunction):
            if not hasattr(method, _MARK):
                continue
            spec = _handler_of(cls, name, method)
            if spec.kind in found:
                raise ConfigError(
                    f"{cls.__qualname__}: {found[spec.kind].name} and {name} both handle "
                    f"kind {spec.kind!r}"
                )
            found[spec.kind] = spec
        cls._handlers = found

    @classmethod
    def handlers(cls) -> Mapping[str, Handler]:
        """The class's handlers by kind."""
        return cls._handlers

    @classmethod
    def capabilities(cls) -> tuple[str, ...]:
        """The names of the tools the class calls."""
        return tuple(t.name for t in cls.tools)


def _handler_of(cls: type[Agent], name: str, method: Callable[..., Any]) -> Handler:
    where = f"{cls.__qualname__}.{name}"
    try:
        hints = get_type_hints(method)
    except Exception as exc:  # any failure to resolve a hint is the user's to fix
        raise ConfigError(f"handler {where}: its type hints do not resolve: {exc}") from None
    params = list(inspect.signature(method).parameters)
    if len(params) != 3 or params[2] not in hints:
        raise ConfigError(
            f"handler {where} must be (self, wf: Workflow, payload: <Struct>) with type hints"
        )
    payload = hints[params[2]]
    if not isinstance(payload, type):
        raise ConfigError(f"handler {where}: its payload type must be a class, got {payload!r}")
    kind = getattr(method, _MARK) or kind_of(payload)
    return Handler(name=name, kind=kind, payload=payload)


class Thought(msgspec.Struct, frozen=True, kw_only=True):
    """A model answer kept in the journal, with the reflections it took."""

    response: ModelResponse
    reflections: int


End = Literal["", "ok", "denied", "rejected", "failed"]


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """A governed call kept in the journal: decided, and once ``end`` is set, finished.

    Attributes:
        tool: the tool's name.
        decision: governance's first answer.
        end: how it finished: ``ok`` (``result`` is the tool's), ``denied``, ``rejected``
            (``reasons``) or ``failed`` (``reasons`` holds the error); empty while it runs.
    """

    tool: str
    decision: str = ""
    approval_id: str = ""
    end: End = ""
    result: Any = None
    reasons: tuple[str, ...] = ()
    retryable: bool = False


class Timer(msgspec.Struct, frozen=True, kw_only=True):
    """A durable timer kept in the journal: when it is due, and whether it fired."""

    due_at: float
    fired: bool = False


class Facts(msgspec.Struct, kw_only=True):
    """What the workflow's `Outcome` reports besides its result, gathered as it runs.

    Attributes:
        first_decision: governance's first answer to the workflow's first governed call
            (here, or at an agent it asked).
        shown: that call as people see it.
        governance_ms: its intent-to-first-decision latency.
        approval_id, approved_by, approval_reasons: the first approval the workflow waited
            for, who settled it and why (a person, or the policy's default when it lapsed).
        model_calls: model calls, here and at the agents it asked (failed attempts
            retried included).
        reflections: unusable answers reflected on, here and at the agents it asked.
        own_reflections: those of this agent, which its intents report to governance.
        policy_hash: the policy set of the latest decision.
    """

    first_decision: str = ""
    shown: dict[str, Any] = {}
    governance_ms: float = 0.0
    approval_id: str = ""
    approved_by: str = ""
    approval_reasons: tuple[str, ...] = ()
    model_calls: int = 0
    reflections: int = 0
    own_reflections: int = 0
    policy_hash: str = ""


class Journal(msgspec.Struct, kw_only=True):
    """Every finished step of one workflow at one agent, saved with its snapshot (in the
    encrypted tool tier) so a handler run again returns what it returned before.

    Attributes:
        thoughts: model answers by key.
        steps: governed calls by step.
        timers: durable timers by name.
        asks: other agents' outcomes by agent id.
        facts: what the outcome reports.
    """

    thoughts: dict[str, Thought] = {}
    steps: dict[int, Step] = {}
    timers: dict[str, Timer] = {}
    asks: dict[str, Outcome] = {}
    facts: Facts = msgspec.field(default_factory=Facts)


class Runtime(Protocol):
    """What a `Workflow` needs of the agent actor that runs it (`AgentHost`)."""

    @property
    def agent_id(self) -> str:
        """The agent's id."""
        ...

    def now(self) -> float:
        """The deployment's clock."""
        ...

    def may(self, tool: str) -> bool:
        """Whether the agent's token grants the capability ``tool``."""
        ...

    def authority_usd(self) -> float:
        """The budget authority of the agent's token (USD a day)."""
        ...

    @property
    def max_tokens(self) -> int:
        """The agent's completion cap per model call."""
        ...

    async def answer(
        self, workflow: str, request: ModelRequest, *, trace: str
    ) -> tuple[ModelResponse, int]:
        """A usable model answer to ``request`` and the reflections it took."""
        ...

    async def decide(
        self,
        workflow: str,
        intent: ToolIntent,
        sent: set[str],
        *,
        trace: str,
        pending: Decision | None = None,
    ) -> Delivery:
        """Governance's first decision on ``intent``, or with ``pending`` (an escalation)
        its final one."""
        ...

    async def run_tool(
        self, workflow: str, intent: ToolIntent, decided: Delivery, sent: set[str], *, trace: str
    ) -> ToolResult:
        """The gateway's answer to the call ``decided`` allows."""
        ...

    async def wait_timer(self, workflow: str, name: str, due_at: float) -> None:
        """Set the durable timer and wait until it fires."""
        ...

    async def ask(self, workflow: str, agent: str, start: WorkflowStart, *, trace: str) -> Outcome:
        """Start ``workflow`` at ``agent`` and wait for its outcome."""
        ...

    async def save(self, wf: Workflow) -> None:
        """Save the workflow's journal and state durably."""
        ...


class Workflow:
    """One workflow at one agent: what a handler is given to think, call tools, wait and ask
    other agents, each step governed and kept (see the module's docs).

    Attributes:
        id: the workflow's id.
        agent_id: the agent's id.
        state: the state the handler saved last (`snapshot`): on a resumed workflow that of
            its latest snapshot, else ``{}``.
        phase: where the workflow is, as its snapshots say: ``started``, ``thinking``,
            ``thought``, ``asking``, ``awaiting_approval``, ``decided``, ``calling``,
            ``called``, ``waiting``, ``woken``, ``asking_agent``, ``answered``, then
            ``done`` or ``halted``.
        where: the details of the phase (the step, tool, timer or agent it is at).
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        id: str,
        trace: str = "",
        journal: Journal | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.id = id
        self.agent_id = runtime.agent_id
        self.trace = trace
        self.state: dict[str, Any] = state if state is not None else {}
        self.journal = journal if journal is not None else Journal()
        self.phase = "started"
        self.where: dict[str, Any] = {}
        self._runtime = runtime
        self._thoughts = 0
        self._parts: dict[str, asyncio.Task[None]] = {}

    @property
    def facts(self) -> Facts:
        """What the workflow's outcome reports besides its result."""
        return self.journal.facts

    def at(self, phase: str, **where: Any) -> None:
        """Note that the workflow is at ``phase`` (with ``where``); the next snapshot says so."""
        self.phase, self.where = phase, where

    def now(self) -> float:
        """The deployment's clock (Unix seconds; simulated when the deployment's is)."""
        return self._runtime.now()

    async def snapshot(self, state: dict[str, Any]) -> None:
        """Save ``state`` (JSON, at most 10 KB) with the workflow's journal; a resumed
        workflow's handler finds it in `state`.

        Raises:
            StateError: ``state`` is not JSON or is over the limit.
        """
        kept, self.state = self.state, dict(state)
        try:
            await self._runtime.save(self)
        except StateError:
            self.state = kept
            raise

    async def think(
        self,
        prompt: str | Sequence[Message],
        *,
        system: str = "",
        schema: Mapping[str, Any] | type | None = None,
        tools: Sequence[ToolSpec[Any, Any]] = (),
        key: str | None = None,
    ) -> ModelResponse:
        """A usable model answer to ``prompt``: each call reserves its spend first, a call
        that fails (a rate limit, a server error, a timeout) is retried with backoff, an
        unusable answer is reflected on up to the agent's cap, and at the workflow's soft
        spending threshold a person is asked whether it may go on.

        Args:
            prompt: what to ask: one user message, or the chat so far (user first).
            system: the system prompt.
            schema: a JSON Schema (or a msgspec Struct type, whose schema it is) the
                answer's text must follow; an answer that is not such JSON is unusable, and
                reflected on.
            tools: tools the model may ask for. A call it asks for comes back in
                ``tool_calls``, not made: the handler makes it with `call_tool`, governed.
            key: names the step in the journal; by default the calls are numbered in order.

        Raises:
            BudgetError: spend was refused (a cap, or a person said no); the workflow ends
                ``halted`` unless the handler catches it.
            ModelError: the model could not be reached, and retrying did not help.
        """
        if key is None:
            self._thoughts += 1
            key = f"think-{self._thoughts}"
        kept = self.journal.thoughts.get(key)
        if kept is not None:
            return kept.response
        facts = self.facts
        self.at("thinking", key=key)
        try:
            response, reflections = await self._runtime.answer(
                self.id,
                ModelRequest(
                    prompt=prompt if isinstance(prompt, str) else "",
                    messages=() if isinstance(prompt, str) else tuple(prompt),
                    system=system,
                    tools=tuple(ToolDef.of(t.schema()) for t in tools),
                    schema=_json_schema(schema),
                    max_tokens=self._runtime.max_tokens,
                    key=key,
                ),
                trace=self.trace,
            )
        except BudgetError as exc:
            facts.model_calls += exc.calls
            facts.reflections += exc.calls
            raise
        self.journal.thoughts[key] = Thought(response=response, reflections=reflections)
        facts.model_calls += reflections + 1 + response.retries
        facts.reflections += reflections
        facts.own_reflections += reflections
        self.at("thought", key=key)
        await self._runtime.save(self)
        return response

    async def act(
        self,
        prompt: str | Sequence[Message],
        *,
        tools: Sequence[ToolSpec[Any, Any]],
        system: str = "",
        schema: Mapping[str, Any] | type | None = None,
        max_turns: int = 8,
        first_step: int = 1,
        tell_failures: bool = False,
        key: str = "act",
    ) -> ModelResponse:
        """Think with ``tools`` until the model answers without asking for one: each call
        it asks for is made governed, with `call_tool`, as the workflow's next step, and
        its result goes back to the model for its next turn.

        A call the model gets wrong (a tool it was not offered, arguments that do not fit
        the tool) never reaches policy: the model is told what was wrong and asked again.

        Args:
            prompt: what to ask: one user message, or the chat so far (user first).
            tools: the tools the model may ask for.
            system: the system prompt.
            schema: what the final answer's text must follow (see `think`).
            max_turns: model answers this may take, the last included.
            first_step: the step number of the first tool call; each further call takes
                the next number, so give the next unused one.
            tell_failures: give the model a denied, rejected or failed call's reasons as
                the call's result and go on, instead of raising.
            key: names the turns in the journal (``key-1``, ``key-2``, ...).

        Returns:
            The model's last answer, which asks for no tool.

        Raises:
            Denied: a call was denied or rejected (unless ``tell_failures``).
            ToolFailed: a call failed (unless ``tell_failures``).
            TurnsExhausted: the model still asked for tools after ``max_turns`` answers.
            BudgetError, ModelError: as `think` raises them.
        """
        if max_turns < 1:
            raise ConfigError(f"act {key!r}: max_turns must be 1 or more, got {max_turns!r}")
        offered = {t.name: t for t in tools}
        chat = [Message(role="user", content=prompt)] if isinstance(prompt, str) else [*prompt]
        step = first_step
        for turn in range(1, max_turns + 1):
            answer = await self.think(
                chat, system=system, schema=schema, tools=tools, key=f"{key}-{turn}"
            )
            if not answer.tool_calls:
                return answer
            chat.append(answer.said())
            for call in answer.tool_calls:
                tool = offered.get(call.name)
                if tool is None:
                    chat.append(
                        Message.result(
                            call,
                            f"no tool {call.name!r}; the tools are: {', '.join(offered)}",
                            error=True,
                        )
                    )
                    continue
                try:
                    args = tool.load_args(call.args)
                except ToolArgumentError as exc:
                    chat.append(Message.result(call, str(exc), error=True))
                    continue
                try:
                    result = await self.call_tool(tool, args, step=step)
                except (Denied, ToolFailed) as exc:
                    if not tell_failures:
                        raise
                    chat.append(Message.result(call, str(exc), error=True))
                else:
                    chat.append(Message.result(call, result))
                finally:
                    step += 1
        raise TurnsExhausted(key, max_turns)

    async def call_tool(self, tool: ToolSpec[A, R], args: A, *, step: int) -> R:
        """Call ``tool`` with ``args`` as step ``step`` of the workflow, governed: the
        intent is decided by policy, an escalation waits (durably) for a person, and the
        gateway runs the call once, however often this is asked again.

        Args:
            tool: the tool (declared with `govmesh.tool`).
            args: its arguments.
            step: the step's number, unique within the workflow at this agent.

        Returns:
            The tool's result.

        Raises:
            Denied: policy denied the call, or a person rejected it.
            ToolFailed: the tool failed (retryable failures were retried first).
            TimeoutError: no decision or answer came within the agent's ``give_up_s``.
            ConfigError: ``step`` was used for another tool.
        """
        done = self.journal.steps.get(step)
        if done is not None and done.tool != tool.name:
            raise ConfigError(f"step {step} of {self.id!r} was {done.tool!r}, not {tool.name!r}")
        if done is None or not done.end:
            done = await self._governed(tool, args, step, done)
        match done.end:
            case "ok":
                return msgspec.convert(done.result, tool.result_type)
            case _:
                raise _failure(
                    done.end,
                    done.reasons,
                    decision=done.decision,
                    approval_id=done.approval_id,
                    retryable=done.retryable,
                )

    async def _governed(
        self, tool: ToolSpec[A, R], args: A, step: int, resumed: Step | None
    ) -> Step:
        """Decide, wait for a person if escalated, and run step ``step``; the journal has
        the step from its first decision on."""
        payload = msgspec.to_builtins(args)
        if not isinstance(payload, dict):
            raise ConfigError(f"{tool.name}: its arguments must be a Struct, got {args!r}")
        shown = {"tool": tool.name, **{k: payload[k] for k in tool.terms.show or payload}}
        facts = self.facts
        first_call = not facts.first_decision
        authority = self._runtime.authority_usd()
        spend = sum(float(payload[name]) for name in tool.terms.spend)
        refusal = ""
        if not self._runtime.may(tool.name):
            refusal = f"{self.agent_id} has no capability {tool.name!r}"
        elif spend > authority:
            refusal = f"spend {spend} is over this agent's authority {authority}"
        if refusal:
            # Governance would drop the intent as a security event; a well-behaved agent
            # never asks beyond what its own token states.
            if first_call:
                facts.shown = shown
            return await self._finish(step, Step(tool=tool.name, end="denied", reasons=(refusal,)))
        intent = ToolIntent(
            tool=tool.name, args=payload, step=step, reflections=facts.own_reflections
        )
        sent: set[str] = set()
        self.at("asking", tool=tool.name, step=step)
        started = time.perf_counter()
        first = await self._runtime.decide(self.id, intent, sent, trace=self.trace)
        decision: Decision = first.body
        record = resumed or Step(
            tool=tool.name, decision=decision.outcome, approval_id=decision.approval_id
        )
        if first_call:
            facts.first_decision = record.decision
            facts.shown = shown
            facts.governance_ms = (time.perf_counter() - started) * 1000
        facts.policy_hash = decision.policy_hash
        self.journal.steps[step] = record
        if decision.final:
            self.at("decided", tool=tool.name, step=step, decision=decision.outcome)
        else:
            self.at("awaiting_approval", tool=tool.name, step=step, approval_id=record.approval_id)
        await self._runtime.save(self)
        final = first
        if not decision.final:
            final = await self._runtime.decide(
                self.id, intent, sent, trace=self.trace, pending=decision
            )
            decision = final.body
        if decision.approval_id and not facts.approval_id:
            facts.approval_id, facts.approved_by = decision.approval_id, decision.approved_by
            facts.approval_reasons = decision.reasons
        if decision.outcome != "allow":
            end: End = "rejected" if decision.approval_id else "denied"
            return await self._finish(
                step, msgspec.structs.replace(record, end=end, reasons=decision.reasons)
            )
        self.at("calling", tool=tool.name, step=step)
        answer = await self._runtime.run_tool(self.id, intent, final, sent, trace=self.trace)
        if answer.ok:
            record = msgspec.structs.replace(record, end="ok", result=answer.result)
        else:
            record = msgspec.structs.replace(
                record, end="failed", reasons=(answer.error,), retryable=answer.retryable
            )
        return await self._finish(step, record)

    async def _finish(self, step: int, record: Step) -> Step:
        self.journal.steps[step] = record
        self.at("called", tool=record.tool, step=step, end=record.end)
        await self._runtime.save(self)
        return record

    async def sleep_until(self, name: str, due_at: float) -> None:
        """Wait until ``due_at`` on the deployment's clock, on a durable timer named
        ``name`` (unique within the workflow at this agent): the wait outlives restarts of
        this agent, the state actor or the whole deployment, and a resumed workflow waits
        for the due time set first."""
        kept = self.journal.timers.get(name)
        if kept is not None and kept.fired:
            return
        if kept is None:
            kept = self.journal.timers[name] = Timer(due_at=due_at)
        self.at("waiting", timer=name, due_at=kept.due_at)
        await self._runtime.save(self)
        await self._runtime.wait_timer(self.id, name, kept.due_at)
        self.journal.timers[name] = Timer(due_at=kept.due_at, fired=True)
        self.at("woken", timer=name)
        await self._runtime.save(self)

    async def sleep(self, name: str, seconds: float) -> None:
        """Wait ``seconds`` on the deployment's clock, on a durable timer named ``name``
        (see `sleep_until`); a resumed workflow waits until the time set first."""
        kept = self.journal.timers.get(name)
        await self.sleep_until(name, kept.due_at if kept is not None else self.now() + seconds)

    @overload
    async def ask(
        self, agent: str, payload: msgspec.Struct, *, returns: type[T], kind: str | None = None
    ) -> T: ...
    @overload
    async def ask(
        self, agent: str, payload: msgspec.Struct, *, returns: None = None, kind: str | None = None
    ) -> None: ...
    async def ask(
        self,
        agent: str,
        payload: msgspec.Struct,
        *,
        returns: type[T] | None = None,
        kind: str | None = None,
    ) -> T | None:
        """Have ``agent`` take part in this workflow: start its handler of ``payload``'s
        kind, durably (the request is sent again until the agent answers, and a restarted
        agent answers from what it kept), and return what the handler returned. Its model
        calls and governance facts are folded into this workflow's outcome. An agent takes
        part in a workflow once.

        Args:
            agent: the agent's id.
            payload: the handler's argument.
            returns: the type of the handler's return value; None to ignore it.
            kind: the handler's kind, when it declares one other than the payload type's.

        Raises:
            Denied: the agent's workflow was denied or rejected.
            ToolFailed: it failed.
            Halted: it was halted.
        """
        outcome = self.journal.asks.get(agent)
        if outcome is None:
            if agent in self._parts and asyncio.current_task() is not self._parts[agent]:
                raise ConfigError(
                    f"{agent} already takes part in {self.id!r}; an agent takes part once"
                )
            start = WorkflowStart(
                kind=kind or kind_of(type(payload)), body=msgspec.msgpack.encode(payload)
            )
            self.at("asking_agent", agent=agent)
            outcome = await self._runtime.ask(self.id, agent, start, trace=self.trace)
            self.journal.asks[agent] = outcome
            _fold(self.facts, outcome)
            self.at("answered", agent=agent, result=outcome.result)
            await self._runtime.save(self)
        match outcome.result:
            case "completed":
                if returns is None:
                    return None
                if not outcome.value:
                    raise ConfigError(
                        f"{agent} returned nothing for {self.id!r}; ask expected {returns!r}"
                    )
                return msgspec.msgpack.decode(outcome.value, type=returns)
            case _:
                raise _failure(
                    outcome.result,
                    outcome.reasons,
                    decision=outcome.first_decision,
                    approval_id=outcome.approval_id,
                )

    async def send(self, agent: str, payload: msgspec.Struct, *, kind: str | None = None) -> None:
        """Have ``agent`` take part in this workflow without waiting for it: its handler of
        ``payload``'s kind starts as `ask` would start it, durably, while this handler goes
        on. The workflow's outcome is told only once every part it sent has ended, with
        their model calls and governance facts folded in; how a part ended (denied,
        failed) does not end this workflow. A resumed workflow sends again, and the agent
        answers from what it kept.

        Raises:
            ConfigError: ``agent`` was sent or asked already in this workflow (an agent
                takes part in a workflow once).
        """
        if agent in self._parts:
            raise ConfigError(
                f"{agent} already takes part in {self.id!r}; an agent takes part once"
            )
        self._parts[agent] = asyncio.create_task(
            self._part(agent, payload, kind), name=f"{self.id}:{agent}"
        )
        await asyncio.sleep(0)  # the part's start goes out before the handler goes on

    async def _part(self, agent: str, payload: msgspec.Struct, kind: str | None) -> None:
        # Its facts are folded in by ask before ask raises for a part that did not complete.
        with contextlib.suppress(Denied, ToolFailed, Halted):
            await self.ask(agent, payload, kind=kind)

    async def parts_ended(self) -> None:
        """Wait until every part `send` started has ended (the host does, before it tells
        the workflow's outcome)."""
        if self._parts:
            await asyncio.gather(*self._parts.values())


def _json_schema(schema: Mapping[str, Any] | type | None) -> dict[str, Any] | None:
    """``schema`` as a JSON Schema: a type's, written out in place."""
    if schema is None:
        return None
    return standalone_schema(schema) if isinstance(schema, type) else dict(schema)


def _failure(
    end: str,
    reasons: tuple[str, ...],
    *,
    decision: str,
    approval_id: str,
    retryable: bool = False,
) -> GovmeshError:
    """The error a handler gets for a governed step, or an asked agent's part, that ended
    ``end`` without a result: `Denied`, `Halted` or, for a failure, `ToolFailed`."""
    match end:
        case "denied" | "rejected":
            return Denied(
                reasons, rejected=end == "rejected", decision=decision, approval_id=approval_id
            )
        case "halted":
            return Halted(reasons)
        case _:
            return ToolFailed("; ".join(reasons), retryable=retryable)


def _fold(facts: Facts, asked: Outcome) -> None:
    """Add what an asked agent reports to this workflow's facts."""
    facts.model_calls += asked.model_calls
    facts.reflections += asked.reflections
    if not facts.first_decision and asked.first_decision:
        facts.first_decision = asked.first_decision
        facts.shown = dict(asked.shown)
        facts.governance_ms = asked.governance_ms
    if not facts.approval_id and asked.approval_id:
        facts.approval_id, facts.approved_by = asked.approval_id, asked.approved_by
        facts.approval_reasons = asked.reasons

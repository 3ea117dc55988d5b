"""The operator's side of approvals: what ``govmesh approvals`` does from another terminal."""

from __future__ import annotations

from types import TracebackType

import redis.asyncio as aioredis

from govmesh.bus import Bus
from govmesh.errors import BusError, ConfigError
from govmesh.governance._approvals import ApprovalRecord, ApprovalStore
from govmesh.governance.messages import ApprovalAnswer, ApprovalRequest, ApprovalResult
from govmesh.identity._permissions import OPERATOR_ROLE
from govmesh.runtime import OPERATOR_MEMBER, JoinedDeployment

__all__ = ["ApprovalNotPending", "OperatorDesk"]


class ApprovalNotPending(ConfigError):
    """The approval named is not pending: unknown, ambiguous, or already settled.

    Attributes:
        record: the settled approval, when it was settled.
    """

    def __init__(self, message: str, *, record: ApprovalRecord | None = None) -> None:
        super().__init__(message)
        self.record = record


class OperatorDesk:
    """An operator joined to a running deployment: lists and answers its approvals.

    It makes its own keys and enrols them over the deployment's enrolment socket as the
    operator member, for a token and certificate that live ten minutes; every answer is
    signed with them.

    Use ``async with OperatorDesk(joined) as desk:``.

    Args:
        joined: the running deployment (see `govmesh.runtime.join`).
    """

    def __init__(self, joined: JoinedDeployment) -> None:
        self.joined = joined
        self._redis: aioredis.Redis | None = None
        self._bus: Bus | None = None

    async def __aenter__(self) -> OperatorDesk:
        self._redis = aioredis.Redis.from_url(self.joined.deployment.redis_url)
        self.store = ApprovalStore(self._redis, self.joined.deployment.key_prefix)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Leave the bus and Redis. Safe to call twice."""
        bus, self._bus = self._bus, None
        if bus is not None:
            await bus.close()
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()

    async def pending(self) -> list[ApprovalRequest]:
        """Every pending approval, oldest first."""
        return await self.store.pending()

    async def find(self, approval_id: str) -> ApprovalRequest:
        """The pending approval whose id is, or starts with, `approval_id`.

        Raises:
            ApprovalNotPending: none or several match, or it is already settled.
        """
        try:
            settled = await self.store.done_matching(approval_id)
        except ValueError as exc:
            raise ApprovalNotPending(str(exc)) from None
        matches = [r for r in await self.store.pending() if r.approval_id.startswith(approval_id)]
        ids = [r.approval_id for r in matches] + [r.approval_id for r in settled]
        if len(ids) > 1:
            raise ApprovalNotPending(f"{approval_id!r} matches several approvals: {', '.join(ids)}")
        if settled:
            raise _settled(settled[0])
        if not matches:
            raise ApprovalNotPending(f"no pending approval {approval_id!r}")
        return matches[0]

    async def answer(
        self, approval_id: str, *, approved: bool, by: str, reason: str = "", timeout: float = 10
    ) -> tuple[ApprovalRequest, ApprovalResult]:
        """Approve or deny `approval_id` (or a unique prefix) as `by`, and return what
        governance decided: an approval still ends in deny when the limits leave no room.

        Raises:
            ApprovalNotPending: as `find`, or settled by someone else meanwhile.
            ConfigError: `by` is empty.
            BusError: no governance actor answered within `timeout`; nothing changed.
        """
        if not by.strip():
            raise ConfigError("--by must name the person answering")
        request = await self.find(approval_id)
        bus = await self._join()
        try:
            reply = await bus.request(
                bus.subjects.approval(request.workflow),
                ApprovalAnswer(
                    approval_id=request.approval_id, approved=approved, by=by, reason=reason
                ),
                accepts=ApprovalResult,
                workflow=request.workflow,
                trace=request.trace,
                timeout=timeout,
            )
        except BusError as exc:
            raise BusError(
                f"no governance actor took the answer to {request.approval_id} ({exc}); it is "
                "still pending, nothing changed"
            ) from None
        result: ApprovalResult = reply.body
        if not result.found:
            settled = await self.store.done(request.approval_id)
            if settled is not None:
                raise _settled(settled)
            raise ApprovalNotPending(f"approval {request.approval_id} is being settled already")
        return request, result

    async def _join(self) -> Bus:
        if self._bus is None:
            identity = await self.joined.member(OPERATOR_MEMBER, OPERATOR_ROLE)
            self._bus = await Bus.connect(self.joined.deployment, identity, rotate=False)
        return self._bus


def _settled(record: ApprovalRecord) -> ApprovalNotPending:
    how = (
        "expired"
        if record.answer.expired
        else f"{'approved' if record.answer.approved else 'denied'} by {record.answer.by}"
    )
    return ApprovalNotPending(
        f"approval {record.approval_id} was already settled: {how}, outcome {record.outcome}",
        record=record,
    )

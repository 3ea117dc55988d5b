"""The operator's side of approvals: what ``govmesh approvals`` does from another terminal."""

from __future__ import annotations

from types import TracebackType

from govmesh.bus import Bus
from govmesh.errors import BusError, ConfigError
from govmesh.governance._approvals import is_id_prefix
from govmesh.governance.messages import (
    ApprovalAnswer,
    ApprovalListing,
    ApprovalQuery,
    ApprovalRequest,
    ApprovalResult,
    SettledApproval,
)
from govmesh.roles import OPERATOR_ROLE
from govmesh.runtime import OPERATOR_MEMBER, JoinedDeployment
from govmesh.subjects import GOVERNANCE_SERVICE

__all__ = ["ApprovalNotPending", "OperatorDesk"]

_QUERY_TIMEOUT_S = 10.0


class ApprovalNotPending(ConfigError):
    """The approval named is not pending: unknown, ambiguous, or already settled.

    Attributes:
        settled: how it was settled, when it was.
    """

    def __init__(self, message: str, *, settled: SettledApproval | None = None) -> None:
        super().__init__(message)
        self.settled = settled


class OperatorDesk:
    """An operator joined to a running deployment: lists and answers its approvals.

    It makes its own keys and enrols them over the deployment's enrolment socket as the
    operator member, for a token and certificate that live ten minutes; every answer is
    signed with them. Everything goes over the bus: governance answers the operator's
    queries (`ApprovalQuery`), so the desk needs no access to the deployment's Redis.

    Use ``async with OperatorDesk(joined) as desk:``.

    Args:
        joined: the running deployment (see `govmesh.runtime.join`).
    """

    def __init__(self, joined: JoinedDeployment) -> None:
        self.joined = joined
        self._bus: Bus | None = None

    async def __aenter__(self) -> OperatorDesk:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Leave the bus. Safe to call twice."""
        bus, self._bus = self._bus, None
        if bus is not None:
            await bus.close()

    async def _query(self, settled_prefix: str = "") -> ApprovalListing:
        """Ask governance for the pending approvals and the settled ones matching.

        Raises:
            BusError: no governance actor answered.
        """
        bus = await self._join()
        try:
            reply = await bus.request(
                bus.subjects.ctl(GOVERNANCE_SERVICE),
                ApprovalQuery(settled_prefix=settled_prefix),
                accepts=ApprovalListing,
                timeout=_QUERY_TIMEOUT_S,
            )
        except BusError as exc:
            raise BusError(f"no governance actor listed the approvals ({exc})") from None
        listing: ApprovalListing = reply.body
        return listing

    async def pending(self) -> list[ApprovalRequest]:
        """Every pending approval, oldest first.

        Raises:
            BusError: no governance actor answered.
        """
        return list((await self._query()).pending)

    async def find(self, approval_id: str) -> ApprovalRequest:
        """The pending approval whose id is, or starts with, `approval_id`.

        Raises:
            ApprovalNotPending: none or several match, or it is already settled.
            BusError: no governance actor answered.
        """
        if not is_id_prefix(approval_id):
            raise ApprovalNotPending(f"approval ids are lowercase hex, got {approval_id!r}")
        listing = await self._query(approval_id)
        matches = [r for r in listing.pending if r.approval_id.startswith(approval_id)]
        ids = [r.approval_id for r in matches] + [r.approval_id for r in listing.settled]
        if len(ids) > 1:
            raise ApprovalNotPending(f"{approval_id!r} matches several approvals: {', '.join(ids)}")
        if listing.settled:
            raise _settled(listing.settled[0])
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
            settled = (await self._query(request.approval_id)).settled
            if settled:
                raise _settled(settled[0])
            raise ApprovalNotPending(f"approval {request.approval_id} is being settled already")
        return request, result

    async def _join(self) -> Bus:
        if self._bus is None:
            identity = await self.joined.member(OPERATOR_MEMBER, OPERATOR_ROLE)
            self._bus = await Bus.connect(self.joined.deployment, identity, rotate=False)
        return self._bus


def _settled(settled: SettledApproval) -> ApprovalNotPending:
    how = (
        "expired"
        if settled.expired
        else f"{'approved' if settled.approved else 'denied'} by {settled.by}"
    )
    return ApprovalNotPending(
        f"approval {settled.approval_id} was already settled: {how}, outcome {settled.outcome}",
        settled=settled,
    )

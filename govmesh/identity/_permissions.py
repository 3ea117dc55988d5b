"""NATS publish/subscribe permissions per role: least privilege, enforced by nats-server.

A pure function of (member, role, subject scheme). What each role may do:

============  ==========================================  ===================================
role          publish                                     subscribe
============  ==========================================  ===================================
agent         intent/usage/state.<own id>, msg.*, tool.>,  msg.<own id>, decision.<own id>.*
              ctl.*
governance    decision.>, approval.*, replies             intent.*, approval.*, ctl.governance
gateway       result.* (its answers, for the record),     tool.>
              replies
budget        approval.* (budget interrupts)              usage.*, ctl.budget
state         msg.* (timers fired), snapshot.*, replies   state.*, ctl.state
issuer        (replies only)                              ctl.identity
operator      approval.*, ctl.governance                  approval.*
auditor       the tenant's stream: its info, creating,    everything of the tenant but
              reading and inspecting its consumers, acks  state.*
coordinator   msg.*, ctl.*, the tenant's stream: create,  msg.<own id>
              its info and its consumers' info
sentinel      (security only)                             nothing but its own replies
unknown       security only                               nothing
============  ==========================================  ===================================

A decision goes to ``decision.<agent>.<workflow>``, so only the agent it answers reads it.
No role may update, purge or delete a stream, or touch another tenant's stream
(`Subjects.jetstream_read`, `Subjects.jetstream_admin`).

Every known role also publishes on ``security`` and on ``ctl.identity`` (token renewal) and
subscribes to its own reply inboxes (`Subjects.inboxes`). Agent roles are named by scenarios
("Requester", "Procurement-Agent-v2"), so the caller says ``agent=True`` for them (the generic
role ``agent`` needs no flag); any other role that is not a platform role gets the minimal
set, so a typo never grants more.
"""

from __future__ import annotations

from typing import Final, TypedDict

from govmesh.errors import ConfigError
from govmesh.roles import (
    AGENT_ROLE,
    AUDITOR_ROLE,
    BUDGET_ROLE,
    COORDINATOR_ROLE,
    GATEWAY_ROLE,
    GOVERNANCE_ROLE,
    ISSUER_ROLE,
    OPERATOR_ROLE,
    PLATFORM_ROLES,
    SENTINEL_ROLE,
    STATE_ROLE,
)
from govmesh.subjects import GOVERNANCE_SERVICE, TOKEN_SERVICE, Subjects

__all__ = ["DENY_ALL", "Permissions", "SubjectRules", "permissions_for", "server_rules"]

DENY_ALL: Final = ">"


class SubjectRules(TypedDict):
    """Subjects allowed and denied for one direction; deny wins on overlap."""

    allow: list[str]
    deny: list[str]


class Permissions(TypedDict):
    """One NATS user's permissions, as nats-server's ``permissions`` block names them."""

    publish: SubjectRules
    subscribe: SubjectRules
    allow_responses: bool


def server_rules(user: str, direction: str, rules: SubjectRules) -> dict[str, list[str]]:
    """`rules` as nats-server takes them (empty lists left out), for a configured user
    or a user JWT alike.

    Raises:
        ConfigError: they allow nothing yet do not deny everything, which nats-server
            would read as "allow all".
    """
    if not rules["allow"] and DENY_ALL not in rules["deny"]:
        raise ConfigError(
            f"{direction} permissions of {user!r} allow nothing but do not deny "
            f"{DENY_ALL!r}; nats-server would allow everything: {rules!r}"
        )
    rendered: dict[str, list[str]] = {}
    if rules["allow"]:
        rendered["allow"] = list(rules["allow"])
    if rules["deny"]:
        rendered["deny"] = list(rules["deny"])
    return rendered


def _rules(allow: list[str]) -> SubjectRules:
    # An empty allow list would leave nats-server's default (allow all) in force.
    return {"allow": allow, "deny": [] if allow else [DENY_ALL]}


def permissions_for(
    member_id: str, role: str, subjects: Subjects, *, agent: bool = False
) -> Permissions:
    """The NATS permissions of `member_id` in `role` on the tenant of `subjects`.

    Args:
        member_id: the member (an agent id or a platform actor id).
        role: its role: a platform role, ``agent``, or a scenario's agent role with `agent`.
        subjects: the tenant's subject scheme.
        agent: `role` is an agent role.

    Raises:
        ConfigError: `agent` is set for a platform role name.
        ValueError: `member_id` is not a valid subject token.
    """
    s = subjects
    if agent and role in PLATFORM_ROLES:
        raise ConfigError(f"role {role!r} is a platform role; an agent role needs another name")
    agent = agent or role == AGENT_ROLE
    base_pub = [s.security, s.ctl(TOKEN_SERVICE)]
    inbox = s.inboxes(member_id)
    pub: list[str]
    sub: list[str]
    responds = False
    unread: list[str] = []
    if agent:
        pub = [s.intent(member_id), s.usage(member_id), s.state(member_id)]
        pub += [s.all("msg"), s.all("tool"), s.all("ctl")]
        sub = [s.msg(member_id), s.decisions(member_id), inbox]
        # Agents answer requests sent to their inbox; the server allows one reply to the
        # reply subject of a message actually received, nothing else.
        responds = True
    elif role == GOVERNANCE_ROLE:
        pub = [s.all("decision"), s.all("approval")]
        sub = [s.all("intent"), s.all("approval"), s.ctl(GOVERNANCE_SERVICE), inbox]
        # Tells an operator's `govmesh approvals approve` what its answer decided.
        responds = True
    elif role in (GATEWAY_ROLE, BUDGET_ROLE, STATE_ROLE, ISSUER_ROLE):
        # The state actor fires timers to agents; the budget actor puts interrupts to people;
        # the gateway records its answers where the event stream keeps them.
        published = {
            STATE_ROLE: [s.all("msg"), s.all("snapshot")],
            BUDGET_ROLE: [s.all("approval")],
            GATEWAY_ROLE: [s.all("result")],
        }
        pub, responds = published.get(role, []), True
        served = {
            GATEWAY_ROLE: [s.all("tool")],
            BUDGET_ROLE: [s.all("usage"), s.ctl("budget")],
            STATE_ROLE: [s.all("state"), s.ctl("state")],
            ISSUER_ROLE: [s.ctl(TOKEN_SERVICE)],
        }
        sub = [*served[role], inbox]
    elif role == OPERATOR_ROLE:
        # Operator tools ask governance for the approvals instead of reading Redis.
        pub = [s.all("approval"), s.ctl(GOVERNANCE_SERVICE)]
        sub = [s.all("approval"), inbox]
    elif role == AUDITOR_ROLE:
        # Reads every event of the tenant (audit index, `govmesh watch`), changes nothing.
        pub = list(s.jetstream_read)
        sub = [s.everything, inbox]
        # Snapshots carry the tool tier in the clear; the stream leaves them out, and so
        # does a live subscription of the auditor.
        unread = [s.all("state")]
    elif role == COORDINATOR_ROLE:
        pub = [s.all("msg"), s.all("ctl"), *s.jetstream_admin]
        sub = [s.msg(member_id), inbox]
    elif role == SENTINEL_ROLE:
        # Publishes security events and renews its token, like every member; nothing else.
        pub, sub = [], [inbox]
    else:
        return {"publish": _rules([s.security]), "subscribe": _rules([]), "allow_responses": False}
    subscribe = _rules(sub)
    subscribe["deny"] += unread
    return {
        "publish": _rules([*pub, *base_pub]),
        "subscribe": subscribe,
        "allow_responses": responds,
    }

"""Governance: policy files compiled into a ``PolicySet`` and the evaluator that decides intents.

Every tool call an agent wants is an ``Intent``; ``evaluate`` turns it into an allow, deny or
escalate ``Verdict`` as a pure function of the policy set, the intent and an ``EvalContext``.
"""

from govmesh.governance._evaluator import (
    OBLIGATION_AWAIT_APPROVAL,
    OBLIGATION_RECORD_SPEND,
    EvalContext,
    Intent,
    Outcome,
    Verdict,
    evaluate,
    intent_hash,
)
from govmesh.governance._policy import (
    DEFAULT_APPROVAL_EXPIRY_S,
    OnExpiry,
    Policy,
    PolicySet,
    RateLimit,
    load_policies,
    load_policy_file,
    parse_policy_text,
)

__all__ = [
    "DEFAULT_APPROVAL_EXPIRY_S",
    "OBLIGATION_AWAIT_APPROVAL",
    "OBLIGATION_RECORD_SPEND",
    "EvalContext",
    "Intent",
    "OnExpiry",
    "Outcome",
    "Policy",
    "PolicySet",
    "RateLimit",
    "Verdict",
    "evaluate",
    "intent_hash",
    "load_policies",
    "load_policy_file",
    "parse_policy_text",
]

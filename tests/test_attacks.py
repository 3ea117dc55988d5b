"""Attacks on a live deployment, as an outsider and as a compromised but legitimate member.

Every test here runs against real servers (nats-server with mutual TLS, a Redis-protocol
server, Ray where the attack needs actors) and checks that the attack is refused at the
right layer and reported. The sections follow the security review that found the holes.
"""

from __future__ import annotations


# ---------------------------------------------------------------------------------------
# 1. The audit index verifies every message of the stream as a live receiver does.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 2. Monitoring survives a malformed message in the stream.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 3. The Redis-protocol server needs credentials.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 4. Publishes refused by nats-server become security events.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 5. A decision is readable only by the agent it answers.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 6. Intents are decided only for workflows the deployment started; budget authority is
#    cumulative.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 7. The advertised directory holds nothing that can mint identities.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 8. State stays with its agent, and the tool tier stays sealed in the stream.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 9. Stream permissions are least privilege, per tenant.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 10. A message replayed to another governance actor of the group is refused.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 11. Safe defaults: no machine settings changed unasked; bounded subscriptions.
# ---------------------------------------------------------------------------------------

"""Identity: signing keys, Agent-ID tokens, replay protection, the deployment CA with
per-role NATS permissions (transport layer of mTLS-A), and enrolment."""

from govmesh.identity._ca import (
    DEFAULT_CLIENT_TTL,
    ClientCert,
    DeploymentCA,
    load_client_cert,
    member_dn,
    renew_before,
    ssl_context,
)
from govmesh.identity._enrol import (
    OPERATOR_MEMBER,
    SOCKET_MEMBERS,
    WATCH_MEMBER,
    EnrolmentServer,
    EnrolRequest,
    Grant,
    MemberKeys,
    certify,
    request_grant,
)
from govmesh.identity._keys import SigningKey, VerifyKey
from govmesh.identity._permissions import Permissions, permissions_for
from govmesh.identity._replay import NonceCache
from govmesh.identity._tokens import (
    DEFAULT_TOKEN_TTL_S,
    Claims,
    Identity,
    Issuer,
    TokenVerifier,
)

__all__ = [
    "DEFAULT_CLIENT_TTL",
    "DEFAULT_TOKEN_TTL_S",
    "OPERATOR_MEMBER",
    "SOCKET_MEMBERS",
    "WATCH_MEMBER",
    "Claims",
    "ClientCert",
    "DeploymentCA",
    "EnrolRequest",
    "EnrolmentServer",
    "Grant",
    "Identity",
    "Issuer",
    "MemberKeys",
    "NonceCache",
    "Permissions",
    "SigningKey",
    "TokenVerifier",
    "VerifyKey",
    "certify",
    "load_client_cert",
    "member_dn",
    "permissions_for",
    "renew_before",
    "request_grant",
    "ssl_context",
]

"""The dataplane API: the messages between an agent and the central agent. Pure values.

An agent *joins* a mesh once, then keeps itself up to date::

    POST /v1/join                                    Bearer <join token>
         JoinRequest  -> JoinResponse (201)          certificates + a node credential
    POST /v1/dataplanes/{mesh}/{name}/certificates   Bearer <node credential>
         RenewRequest -> Certificates                renewal: new keys, same services
    GET  /v1/dataplanes/{mesh}/{name}/config?after=<version>&wait=<seconds>
         -> DataplaneConfig                          long poll: answers when the version
                                                     differs from ``after``, or at ``wait``
    PUT  /v1/dataplanes/{mesh}/{name}/status         Bearer <node credential>
         StatusReport -> 204                         heartbeat: applied version, expiry,
                                                     unhealthy inbound services
    PUT  /v1/dataplanes/{mesh}/{name}                Bearer <node credential>
         DataplaneUpdate -> 204                      agent.toml changed (ports, tags,
                                                     outbounds, address); same identities

Rules both sides keep:

* Keys are made on the host; only CSRs (PEM) travel. ``csrs`` and ``certificates`` map a
  service name to PEM text; an agent asks for one certificate per identity it presents
  (each inbound service and each outbound source).
* ``DataplaneConfig.version`` is the mesh's revision: it only grows, and any change the
  dataplane may care about (mesh settings, policies, other dataplanes) raises it.
* Fields added later get defaults, so older peers decode newer messages.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from meshagent.snapshot.model import (
    Endpoint,
    MtlsMode,
    OutboundRoutes,
    Protocol,
    RequestPolicy,
)

# The longest long poll a central agent serves; agents ask for less.
MAX_WAIT_SECONDS: Final = 60.0


class _Message(msgspec.Struct, frozen=True, kw_only=True):
    pass


class InboundSpec(_Message, frozen=True, kw_only=True):
    """An inbound a dataplane serves: what other dataplanes' built-in catalog lists."""

    service: str
    port: int
    protocol: Protocol = "tcp"
    tags: dict[str, str] = {}


class OutboundSpec(_Message, frozen=True, kw_only=True):
    """An outbound a dataplane has: the central agent compiles its routes."""

    service: str
    port: int
    protocol: Protocol = "tcp"
    source: str


class JoinRequest(_Message, frozen=True, kw_only=True):
    mesh: str
    dataplane: str  # unique in the mesh; joining again under a name replaces it
    node: str
    address: str  # where other agents reach this one's inbounds
    inbounds: list[InboundSpec] = []
    outbounds: list[OutboundSpec] = []
    csrs: dict[str, str]  # service -> CSR PEM, one per identity presented


class DataplaneUpdate(_Message, frozen=True, kw_only=True):
    """A joined dataplane's listeners after an agent.toml change. The identities (its
    inbound services and outbound sources) must stay those it joined with: another
    identity needs a certificate, and so a join token."""

    node: str
    address: str
    inbounds: list[InboundSpec] = []
    outbounds: list[OutboundSpec] = []


class Certificates(_Message, frozen=True, kw_only=True):
    certificates: dict[str, str]  # service -> certificate PEM
    ca_bundle: str  # the mesh's trust bundle (CA certificates, PEM)


class JoinResponse(_Message, frozen=True, kw_only=True):
    mesh: str
    dataplane: str
    node_token: str  # the credential for every later call; shown once
    certificates: dict[str, str]
    ca_bundle: str


class RenewRequest(_Message, frozen=True, kw_only=True):
    csrs: dict[str, str]


class DataplaneConfig(_Message, frozen=True, kw_only=True):
    """What the central agent compiled for one dataplane, at one mesh revision."""

    version: int
    mesh: str
    mtls: MtlsMode = "strict"
    ca_bundle: str = ""
    routes: dict[str, OutboundRoutes] = {}  # by outbound service
    permissions: dict[str, tuple[str, ...]] = {}  # by inbound service
    default_allow: bool = True
    request_policies: dict[str, RequestPolicy] = {}
    # The built-in catalog: every service the routes send to, with the endpoints other
    # dataplanes of the mesh serve. Agents that follow Consul ignore it.
    endpoints: dict[str, tuple[Endpoint, ...]] = {}
    # How often the agent reports its status (central.toml heartbeat_interval); the
    # central agent counts a dataplane offline after three missed reports.
    heartbeat_seconds: float = 10.0
    # The fingerprint (hex SHA-256 of the DER) of the CA that signs the mesh's
    # certificates now; "" from a central agent that does not say. A dataplane whose
    # certificates come from another CA (a rotation started) renews them within
    # ``rotation_spread_seconds``, at a random moment so a large mesh does not renew
    # all at once.
    signing_ca: str = ""
    rotation_spread_seconds: float = 60.0


class StatusReport(_Message, frozen=True, kw_only=True):
    applied_version: int
    state: Literal["applied", "rejected"] = "applied"
    error: str = ""  # why a config was rejected
    cert_not_after: float | None = None  # seconds since the epoch, earliest of its certs
    # The fingerprints of the CAs that issued its certificates (see
    # DataplaneConfig.signing_ca); None from an agent that does not say.
    cert_issuers: list[str] | None = None
    # Its inbound services whose health probes fail (agent.toml ``[inbound.health]``);
    # None from an agent that does not say (an older one, or one that follows Consul),
    # which keeps what the central agent knew. The built-in catalog leaves these out.
    unhealthy: list[str] | None = None


__all__ = [
    "MAX_WAIT_SECONDS",
    "Certificates",
    "DataplaneConfig",
    "DataplaneUpdate",
    "InboundSpec",
    "JoinRequest",
    "JoinResponse",
    "OutboundSpec",
    "RenewRequest",
    "StatusReport",
]

"""Joining a mesh and renewing certificates: the checks of a request and the signing of
its CSRs. Pure (no trio, no store).

Theory of operation:

* A join request names the dataplane (its inbounds and outbounds) and brings one CSR
  per *identity* it presents: each inbound service and each outbound source. The
  join token allows one mesh and a set of services; every identity must be among them.
* ``check_join`` runs every check, the CSRs' included, *before* the caller uses the
  join token, so a malformed request never burns a one-use token. Signing comes after
  the token was consumed (``sign_csrs``), so of two racers only the winner gets
  certificates; by then nothing is left to fail but a bug.
* A renewal (``check_renewal``) brings CSRs for services the node credential allows:
  the join token's services.
* Refusals are ``BadRequest`` (malformed: HTTP 400) or ``Forbidden`` (not allowed: 403),
  each one line naming the field (``inbounds[1].port``, ``csrs.web``).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshagent.pki.ca import PemPair
from meshagent.pki.csr import CsrRejected, requested_identity, sign_csr
from meshagent.pki.identity import NAME_RULE, is_valid_name
from meshagent.snapshot.wire import DataplaneUpdate, JoinRequest

MAX_NODE_CHARS = 253


class Refused(ValueError):
    """A join or renewal that is not granted; ``str()`` is one line naming the field."""


class BadRequest(Refused):
    """The request is malformed (HTTP 400)."""


class Forbidden(Refused):
    """The credential does not allow what the request asks for (HTTP 403)."""


@dataclass(frozen=True, slots=True)
class Signed:
    """Certificates (service -> PEM) and the earliest expiry among them (epoch seconds)."""

    certificates: dict[str, str]
    not_after: float


def identities(request: JoinRequest) -> list[str]:
    """The services a dataplane presents itself as: its inbound services and outbound
    sources, sorted."""
    names = {inbound.service for inbound in request.inbounds}
    names |= {outbound.source for outbound in request.outbounds}
    return sorted(names)


def check_join(request: JoinRequest, *, token_mesh: str, allowed: Collection[str]) -> list[str]:
    """Every check of a join request that a join token of ``token_mesh`` allowing
    ``allowed`` services may grant. Returns the identities (sorted).

    Raises:
        Forbidden: another mesh, or an identity the token does not allow.
        BadRequest: anything malformed (names, address, ports, CSRs).
    """
    if request.mesh != token_mesh:
        raise Forbidden(f"mesh: this join token is not valid for mesh {request.mesh}")
    _check_name("dataplane", request.dataplane)
    _check_node(request.node)
    _check_address(request.address)
    _check_listeners(request)
    wanted = identities(request)
    if not wanted:
        raise BadRequest("inbounds, outbounds: a dataplane needs at least one of them")
    for field, service in _identity_fields(request):
        if service not in allowed:
            raise Forbidden(
                f"{field}: this join token does not allow service {service!r} "
                f"(it allows: {', '.join(sorted(allowed))})"
            )
    missing = [s for s in wanted if s not in request.csrs]
    if missing:
        raise BadRequest(
            f"csrs: no CSR for {', '.join(missing)} (send one per identity: each inbound "
            "service and each outbound source)"
        )
    for service in sorted(request.csrs):
        if service not in wanted:
            raise BadRequest(
                f"csrs.{service}: {service!r} is not an inbound service or outbound source "
                "of this dataplane"
            )
        check_csr(service, request.csrs[service], mesh=request.mesh)
    return wanted


def check_update(
    update: DataplaneUpdate, *, mesh: str, name: str, identities_now: Collection[str]
) -> None:
    """Every check of a joined dataplane's new listeners.

    Raises:
        Forbidden: the identities differ from those it joined with.
        BadRequest: anything malformed (node, address, names, ports).
    """
    request = JoinRequest(
        mesh=mesh,
        dataplane=name,
        node=update.node,
        address=update.address,
        inbounds=update.inbounds,
        outbounds=update.outbounds,
        csrs={},
    )
    _check_node(request.node)
    _check_address(request.address)
    _check_listeners(request)
    wanted = identities(request)
    if sorted(wanted) != sorted(identities_now):
        raise Forbidden(
            f"inbounds, outbounds: the services this dataplane presents would change from "
            f"{', '.join(sorted(identities_now)) or 'none'} to {', '.join(wanted) or 'none'}; "
            "join again with a join token for the new set"
        )


def check_renewal(csrs: Mapping[str, str], *, mesh: str, allowed: Collection[str]) -> None:
    """Every check of a renewal by a node credential of ``mesh`` allowing ``allowed``.

    Raises:
        BadRequest: no CSRs, or a malformed one. Forbidden: a service not allowed.
    """
    if not csrs:
        raise BadRequest("csrs: send at least one CSR")
    for service in sorted(csrs):
        if service not in allowed:
            raise Forbidden(
                f"csrs.{service}: this node credential does not allow service {service!r} "
                f"(it allows: {', '.join(sorted(allowed))})"
            )
        check_csr(service, csrs[service], mesh=mesh)


def check_csr(service: str, csr_pem: str, *, mesh: str) -> None:
    """Will ``sign_csr`` accept this CSR for ``service`` of ``mesh``?

    Raises:
        BadRequest: not a CSR, a bad signature, not an EC key, or another service than
            the one it is sent for. Forbidden: it asks for another mesh.
    """
    field = f"csrs.{service}"
    try:
        csr, asked_mesh, asked_service = requested_identity(csr_pem.encode())
    except CsrRejected as exc:
        raise BadRequest(f"{field}: {exc}") from None
    if asked_mesh != mesh:
        raise Forbidden(f"{field}: the CSR asks for mesh {asked_mesh!r}, not {mesh!r}")
    if asked_service != service:
        raise BadRequest(f"{field}: the CSR asks for service {asked_service!r}, not {service!r}")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise BadRequest(f"{field}: only EC keys are accepted (generate an EC P-256 key)")


def sign_csrs(
    ca: PemPair,
    csrs: Mapping[str, str],
    *,
    mesh: str,
    allowed: Collection[str],
    now: datetime,
    ttl: timedelta,
) -> Signed:
    """Sign checked CSRs with the mesh CA (``sign_csr`` checks mesh and services again).

    Raises:
        Forbidden: ``sign_csr`` refused one (the checks before should have caught it).
    """
    certificates: dict[str, str] = {}
    not_after: list[float] = []
    for service, csr_pem in sorted(csrs.items()):
        try:
            _, cert_pem = sign_csr(
                ca, csr_pem.encode(), mesh=mesh, allowed_services=allowed, now=now, ttl=ttl
            )
        except CsrRejected as exc:
            raise Forbidden(f"csrs.{service}: {exc}") from None
        certificates[service] = cert_pem.decode()
        cert = x509.load_pem_x509_certificate(cert_pem)
        not_after.append(cert.not_valid_after_utc.timestamp())
    return Signed(certificates=certificates, not_after=min(not_after))


# ---------------------------------------------------------------------------- field checks


def _check_name(field: str, name: str) -> None:
    if not is_valid_name(name):
        raise BadRequest(f"{field}: {name!r} is not a valid name: use {NAME_RULE}")


def _check_node(node: str) -> None:
    """A host name: dot-separated labels of letters, digits and '-' (either case)."""
    labels = node.split(".")
    if len(node) > MAX_NODE_CHARS or not all(is_valid_name(label.lower()) for label in labels):
        raise BadRequest(
            f"node: {node!r} is not a host name (labels of letters, digits and '-', "
            "separated by dots)"
        )


def _check_address(address: str) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise BadRequest(
            f"address: {address!r} is not an IP address (where other agents reach this "
            "one's inbounds)"
        ) from None


def _check_port(field: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise BadRequest(f"{field}: {port} is not a port (1 to 65535)")


def _check_listeners(request: JoinRequest) -> None:
    for i, inbound in enumerate(request.inbounds):
        _check_name(f"inbounds[{i}].service", inbound.service)
        _check_port(f"inbounds[{i}].port", inbound.port)
    for i, outbound in enumerate(request.outbounds):
        _check_name(f"outbounds[{i}].service", outbound.service)
        _check_name(f"outbounds[{i}].source", outbound.source)
        _check_port(f"outbounds[{i}].port", outbound.port)
    _check_unique("inbounds", "port", [inbound.port for inbound in request.inbounds])
    _check_unique("outbounds", "port", [outbound.port for outbound in request.outbounds])
    # The config keys routes by outbound service: two outbounds of one service would clash.
    _check_unique("outbounds", "service", [outbound.service for outbound in request.outbounds])


def _check_unique(listeners: str, key: str, values: list[object]) -> None:
    counts = Counter(values)
    for index, value in enumerate(values):
        if counts[value] > 1:
            raise BadRequest(
                f"{listeners}[{index}].{key}: {value} is used by another of the "
                f"{listeners}; each needs its own"
            )


def _identity_fields(request: JoinRequest) -> list[tuple[str, str]]:
    fields = [(f"inbounds[{i}].service", b.service) for i, b in enumerate(request.inbounds)]
    fields += [(f"outbounds[{i}].source", b.source) for i, b in enumerate(request.outbounds)]
    return fields


__all__ = [
    "BadRequest",
    "Forbidden",
    "Refused",
    "Signed",
    "check_csr",
    "check_join",
    "check_renewal",
    "identities",
    "sign_csrs",
]

"""SPIFFE identities of mesh services: ``spiffe://<mesh>/service/<service>``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

NAME_RULE = "1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_SCHEME = "spiffe://"
_FORM = "spiffe://<mesh>/service/<service>"


def is_valid_name(name: str) -> bool:
    """Whether ``name`` is usable as a mesh or service name (a DNS label, lowercase)."""
    return _NAME.fullmatch(name) is not None


def _check_name(kind: str, name: str) -> None:
    if not is_valid_name(name):
        raise ValueError(f'invalid {kind} name "{name}": use {NAME_RULE}')


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    """The identity of one mesh service.

    Raises:
        ValueError: on construction, if ``mesh`` or ``service`` is not a valid name.
    """

    mesh: str
    service: str

    def __post_init__(self) -> None:
        _check_name("mesh", self.mesh)
        _check_name("service", self.service)

    @property
    def uri(self) -> str:
        """The SPIFFE ID, ``spiffe://<mesh>/service/<service>``."""
        return f"{_SCHEME}{self.mesh}/service/{self.service}"


def spiffe_id(mesh: str, service: str) -> str:
    """Return the SPIFFE ID of ``service`` in ``mesh``.

    Raises:
        ValueError: ``mesh`` or ``service`` is not a valid name (see ``NAME_RULE``).
    """
    return ServiceIdentity(mesh, service).uri


def parse_spiffe_id(uri: str) -> ServiceIdentity:
    """Parse a service SPIFFE ID; the exact inverse of ``spiffe_id``.

    Raises:
        ValueError: ``uri`` is not of the form ``spiffe://<mesh>/service/<service>``
            with valid names.
    """
    parts = uri.removeprefix(_SCHEME).split("/") if uri.startswith(_SCHEME) else []
    if len(parts) != 3 or parts[1] != "service":
        raise ValueError(f'invalid SPIFFE ID "{uri}": expected {_FORM}')
    mesh, _, service = parts
    try:
        return ServiceIdentity(mesh, service)
    except ValueError as exc:
        raise ValueError(f'invalid SPIFFE ID "{uri}": {exc}') from None


def identities_from_peercert(peercert: Mapping[str, object] | None) -> list[str]:
    """Return the URI subjectAltName values of a peer certificate.

    Args:
        peercert: what ``ssl.SSLObject.getpeercert()`` returned; None (no handshake
            yet) and an empty dict (peer not verified) yield no identities.

    Returns:
        The URI SAN values, in certificate order; usually a single SPIFFE ID.
    """
    sans = peercert.get("subjectAltName", ()) if peercert else ()
    if not isinstance(sans, tuple):
        return []
    return [
        entry[1]
        for entry in sans
        if isinstance(entry, tuple)
        and len(entry) == 2
        and entry[0] == "URI"
        and isinstance(entry[1], str)
    ]

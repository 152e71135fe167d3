"""Certificates for tests, made by meshagent's own issuer (trustme cannot issue spiffe:// SANs)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from meshagent.dataplane.tls import IdentityFiles
from meshagent.pki.ca import PemPair, create_ca, issue_leaf
from meshagent.pki.files import write_private_file, write_public_file


@dataclass(frozen=True)
class MeshCa:
    mesh: str
    pair: PemPair
    directory: Path

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    def issue(self, service: str, *, mesh: str | None = None) -> IdentityFiles:
        """Write ``service``'s cert and key (for ``mesh``, default the CA's) and name them."""
        now = datetime.now(UTC)
        leaf = issue_leaf(self.pair, mesh or self.mesh, service, now=now, ttl=timedelta(hours=1))
        cert = self.directory / f"{service}.pem"
        key = self.directory / f"{service}-key.pem"
        write_public_file(cert, leaf.cert_pem)
        write_private_file(key, leaf.key_pem)
        return IdentityFiles(ca=str(self.ca_path), cert=str(cert), key=str(key))


def make_ca(directory: Path, mesh: str) -> MeshCa:
    directory.mkdir(parents=True, exist_ok=True)
    pair = create_ca(mesh, now=datetime.now(UTC))
    write_public_file(directory / "ca.pem", pair.cert_pem)
    write_private_file(directory / "ca-key.pem", pair.key_pem)
    return MeshCa(mesh, pair, directory)

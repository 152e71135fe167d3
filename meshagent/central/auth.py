"""Who is calling the central agent's API, and what they may see.

Theory of operation:

* Callers present ``Authorization: Bearer ma1_<id>_<secret>``. The store keeps only the
  SHA-256 digest of a token (``pki.secrets.token_digest``); a request is authenticated
  by looking its token up by id (``Store.get_token``) and comparing the digests in
  constant time; an admin token must not have expired. The token id (public) is the
  actor in audit entries.
* A *global* admin token (``meshes == ()``) sees every mesh and may create meshes and
  admin tokens. A *mesh-scoped* admin token sees only its meshes: any other mesh does
  not exist for it (404, not 403), so a tenant cannot probe other tenants' names.
* A *node credential* (a "node" token, made when a dataplane joins) acts only for the
  dataplane whose record names its id (``authenticate_node``).
* The first global admin token is made at first start and written to
  ``<data_dir>/admin.token`` (0600); later starts reuse it, and register it again if
  the store was replaced.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import trio

from meshagent.central.dataplanes import decode_spec
from meshagent.central.store import DataplaneRecord, NotFound, Store, TokenRecord
from meshagent.pki.files import write_private_file
from meshagent.pki.secrets import SecretError, new_token, token_digest, token_id_of

ADMIN_TOKEN_FILE = "admin.token"


class Unauthenticated(Exception):
    """No usable credentials; ``str()`` is one line for the client (HTTP 401)."""


class UnknownToken(Unauthenticated):
    """The token is not (or no longer) in the store: never issued, deleted, used up."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: its token id and the meshes it may manage.

    ``meshes`` is None for a global admin (every mesh).
    """

    token_id: str
    meshes: frozenset[str] | None

    @property
    def is_global(self) -> bool:
        return self.meshes is None

    def can_see(self, mesh: str) -> bool:
        """May this caller see (and manage) ``mesh``?"""
        return self.meshes is None or mesh in self.meshes


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header.

    Raises:
        Unauthenticated: no header, or not a bearer token.
    """
    if not authorization:
        raise Unauthenticated("missing Authorization: Bearer <token> header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be: Bearer <token>")
    return token.strip()


async def authenticate(store: Store, authorization: str | None, *, now: float) -> Principal:
    """Find the admin token of a request. Cancel point.

    Raises:
        Unauthenticated: missing, malformed, unknown or expired token.
        StoreUnavailable: the store cannot answer.
    """
    return _principal(await find_token(store, authorization), now)


async def find_token(store: Store, authorization: str | None) -> TokenRecord:
    """The stored token of a request's bearer token, of any kind. Cancel point.

    Looked up by its (public) id, then its digest compared in constant time.

    Raises:
        Unauthenticated: missing or malformed token; UnknownToken: not in the store.
        StoreUnavailable: the store cannot answer.
    """
    token = bearer_token(authorization)
    try:
        token_id = token_id_of(token)
        record = await store.get_token(token_id)
    except (SecretError, ValueError):
        raise Unauthenticated("not a meshagent token (expected ma1_<id>_<secret>)") from None
    except NotFound:
        raise UnknownToken("unknown token") from None
    if not hmac.compare_digest(record.digest, token_digest(token)):
        raise UnknownToken("unknown token")
    return record


async def authenticate_node(
    store: Store, authorization: str | None, *, mesh: str, name: str
) -> tuple[TokenRecord, DataplaneRecord]:
    """Check that a request comes from the node credential of dataplane ``name`` of
    ``mesh``: a "node" token whose id that dataplane's record names. Cancel point.

    Returns:
        The token and the dataplane's record.

    Raises:
        Unauthenticated: anything else; the same line whether or not the mesh or the
            dataplane exist, so a credential of one mesh learns nothing of another.
        StoreUnavailable: the store cannot answer.
    """
    token = await find_token(store, authorization)
    if token.kind != "node":
        raise Unauthenticated("this token is not a node credential")
    refused = Unauthenticated(
        f"this node credential is not valid for dataplane {name} in mesh {mesh}"
    )
    if token.mesh != mesh:
        raise refused
    try:
        record = await store.get_dataplane(mesh, name)
    except NotFound:
        raise refused from None
    if decode_spec(record).node_token_id != token.id:
        raise refused
    return token, record


def _principal(record: TokenRecord, now: float) -> Principal:
    if record.kind != "admin":
        raise Unauthenticated("this token is not an admin token")
    if record.expires_at is not None and record.expires_at <= now:
        raise Unauthenticated("this token has expired; ask an admin for a new one")
    meshes = None if not record.meshes else frozenset(record.meshes)
    return Principal(token_id=record.id, meshes=meshes)


def admin_token_record(
    token_id: str,
    digest: str,
    *,
    meshes: tuple[str, ...],
    now: float,
    expires_at: float | None = None,
) -> TokenRecord:
    """The stored form of an admin token (``meshes == ()``: global)."""
    return TokenRecord(
        id=token_id,
        mesh=None,
        kind="admin",
        digest=digest,
        meshes=meshes,
        expires_at=expires_at,
        created_at=now,
    )


async def ensure_admin_token(store: Store, path: Path, *, now: float) -> bool:
    """Make sure the global admin token in ``path`` exists and is known to the store.

    Returns:
        True if a new token was made (first start).

    Raises:
        PkiError: the file cannot be written.
        SecretError: the file holds something that is not a token.
        StoreUnavailable, Conflict: the store failed.
    """
    try:
        token = (await trio.to_thread.run_sync(path.read_text)).strip()
    except FileNotFoundError:
        token = ""
    if token:
        try:
            token_id = token_id_of(token)
        except SecretError:
            raise SecretError(
                f"{path}: not a meshagent token; delete it to make a new admin token"
            ) from None
        digest = token_digest(token)
        try:
            known = await store.get_token(token_id)
        except NotFound:
            pass
        else:
            if hmac.compare_digest(known.digest, digest):
                return False
        await store.create_token(admin_token_record(token_id, digest, meshes=(), now=now))
        return False
    token, token_id, digest = new_token()
    # The file first: if the store write fails, the next start registers it again.
    await trio.to_thread.run_sync(write_private_file, path, (token + "\n").encode())
    await store.create_token(admin_token_record(token_id, digest, meshes=(), now=now))
    return True

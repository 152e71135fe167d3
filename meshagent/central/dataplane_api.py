"""The dataplane API: what agents call (messages in ``snapshot.wire``).

    POST /v1/join                                    Bearer <join token>
         JoinRequest  -> 201 JoinResponse
    POST /v1/dataplanes/{mesh}/{name}/certificates   Bearer <node credential>
         RenewRequest -> 200 Certificates
    GET  /v1/dataplanes/{mesh}/{name}/config?after=N&wait=SECONDS
                                                     Bearer <node credential>
         -> 200 DataplaneConfig (long poll)
    PUT  /v1/dataplanes/{mesh}/{name}/status         Bearer <node credential>
         StatusReport -> 204
    PUT  /v1/dataplanes/{mesh}/{name}                Bearer <node credential>
         DataplaneUpdate -> 204                      agent.toml changed, same identities

Theory of operation:

* Joining: the join token is looked up (not used) and every check of the request runs
  (``central.joining.check_join``) and the mesh CA is unsealed; only then is the token
  consumed (atomically: of racers on a one-use token one wins, the others get 401),
  and only then are the CSRs signed. A malformed request never burns a token; a lost
  race never yields a certificate. The join creates a node credential (a "node"
  token of the mesh, allowed the join token's services, no expiry), stores the
  dataplane with that credential's id (replacing a dataplane of the same name, whose
  credential is deleted; only one whose services the token allows, so a token for
  one service cannot take over another service's dataplane), audits it (actor: the
  join token's id) and answers the credential once.
* Every other call authenticates with the node credential (``auth.authenticate_node``):
  a node token whose id the dataplane's record names. Anything else, an unknown mesh
  or dataplane included, is 401 with the same line, so credentials of one mesh learn
  nothing about another.
* Config: a long poll on the mesh revision (``Store.wait_for_change``, at most
  ``MAX_WAIT_SECONDS``), then the config compiled for this dataplane from the store
  read *after* the revision (``central.dataplanes.compile_config``): a config is never
  older than its version says.
* Certificates are signed by the mesh's current CA; the answer's trust bundle holds
  the previous CA too during a rotation. The record keeps which CA signed
  (``cert_issuers``), until the agent's own reports say.
* Status: a heartbeat (``last_seen``), the version applied, the earliest certificate
  expiry, the CAs that issued its certificates, and the last rejection (kept until a
  report says "applied"; a new error is logged once as a warning). The heartbeat of a
  dataplane the leader marked offline brings it back into the built-in catalog (the
  store bumps the revision).
* Health: a report names the dataplane's inbound services whose probes fail
  (``unhealthy``; names that are not its inbound services are dropped). A change of
  that set bumps the revision (the store does it in the same write), so every
  caller's long poll returns with a catalog without them; each change is logged once.
"""

from __future__ import annotations

import math
import re
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Final

from starlette.requests import Request
from starlette.responses import Response

from meshagent.central.auth import (
    Unauthenticated,
    UnknownToken,
    authenticate_node,
    find_token,
)
from meshagent.central.dataplanes import (
    compile_config,
    decode_spec,
    new_dataplane,
    panicking_services,
    updated_dataplane,
)
from meshagent.central.joining import (
    Forbidden,
    Signed,
    check_join,
    check_renewal,
    check_update,
    sign_csrs,
)
from meshagent.central.meshes import decode_spec as decode_mesh_spec
from meshagent.central.meshes import signing_pair, trust_bundle
from meshagent.central.store import DataplaneRecord, NotFound, TokenRecord
from meshagent.central.web import (
    ApiError,
    CentralState,
    audit,
    json_body,
    log,
    parse_count,
    struct_response,
)
from meshagent.pki.ca import PemPair
from meshagent.pki.rotation import ca_fingerprint, short
from meshagent.pki.secrets import new_token
from meshagent.snapshot.wire import (
    MAX_WAIT_SECONDS,
    Certificates,
    DataplaneUpdate,
    JoinRequest,
    JoinResponse,
    RenewRequest,
    StatusReport,
)

# The long poll's wait when the agent names none.
DEFAULT_WAIT_SECONDS: Final = 30.0
# A rejection's error is kept as one line of at most this many characters.
MAX_ERROR_CHARS: Final = 1000
_MAX_VERSION: Final = 2**62
# A status report names at most this many issuing CAs (one per certificate).
MAX_ISSUERS: Final = 64
_FINGERPRINT: Final = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------- join


async def join(request: Request, state: CentralState) -> Response:
    """POST /v1/join: a dataplane joins a mesh with a join token."""
    now = state.clock()
    token, token_mesh = await _join_token(request, state, now)
    body = await json_body(request, state, JoinRequest)
    services = check_join(body, token_mesh=token_mesh, allowed=token.services)
    previous = await _existing(state, body.mesh, body.dataplane)
    _check_replaceable(previous, token)
    ca, bundle = await _mesh_ca(state, body.mesh)
    # Every check passed: use the token now, and sign only if this request won it.
    try:
        await state.store.consume_token(token.digest, now)
    except NotFound:
        raise Unauthenticated("this join token has expired or is used up") from None
    signed = _sign(state, ca, body.csrs, mesh=body.mesh, allowed=token.services, now=now)
    node_token = await _store_dataplane(
        state, body, token, signed, previous, now, issuer=ca_fingerprint(ca.cert_pem)
    )
    replaced = previous is not None
    detail = f"node={body.node} address={body.address} services={','.join(services)}"
    await audit(
        state,
        token.id,
        "dataplane.join",
        mesh=body.mesh,
        target=f"dataplane {body.dataplane}",
        detail=detail + (" replaced" if replaced else ""),
    )
    log.info(
        "dataplane joined",
        mesh=body.mesh,
        dataplane=body.dataplane,
        node=body.node,
        services=",".join(services),
        replaced=replaced,
    )
    answer = JoinResponse(
        mesh=body.mesh,
        dataplane=body.dataplane,
        node_token=node_token,
        certificates=signed.certificates,
        ca_bundle=bundle,
    )
    return struct_response(answer, status=201)


async def _join_token(request: Request, state: CentralState, now: float) -> tuple[TokenRecord, str]:
    """The request's join token (looked up, not used yet) and its mesh.

    Raises:
        Unauthenticated: no usable join token.
    """
    try:
        token = await find_token(state.store, request.headers.get("authorization"))
    except UnknownToken:
        raise UnknownToken(
            "unknown join token: it never existed, was deleted, or is used up; ask an admin "
            "for a new one"
        ) from None
    if token.kind != "join" or token.mesh is None:
        raise Unauthenticated("this token is not a join token")
    if token.expires_at is not None and token.expires_at <= now:
        raise Unauthenticated("this join token has expired; ask an admin for a new one")
    return token, token.mesh


def _check_replaceable(previous: DataplaneRecord | None, token: TokenRecord) -> None:
    """A join replaces a dataplane of the same name only if the token could have made it.

    Raises:
        Forbidden: the dataplane presents services the join token does not allow.
    """
    if previous is None:
        return
    foreign = sorted(set(previous.services) - set(token.services))
    if foreign:
        raise Forbidden(
            f"dataplane: {previous.name} exists with services this join token does not "
            f"allow ({', '.join(foreign)}); delete it first or join under another name"
        )


async def _store_dataplane(
    state: CentralState,
    body: JoinRequest,
    join_token: TokenRecord,
    signed: Signed,
    previous: DataplaneRecord | None,
    now: float,
    *,
    issuer: str,
) -> str:
    """Make the node credential and store the dataplane, replacing ``previous`` (whose
    credential goes). Returns the credential (the secret, shown once)."""
    node_token, node_record = _node_token(join_token, now)
    await state.store.create_token(node_record)
    record = new_dataplane(
        body,
        node_token_id=node_record.id,
        now=now,
        cert_not_after=signed.not_after,
        cert_issuers=(issuer,),
    )
    try:
        await state.store.put_dataplane(record)
    except Exception:
        with suppress(Exception):  # best effort: a credential no record names opens nothing
            await state.store.delete_token(node_record.id)
        raise
    if previous is not None:
        with suppress(NotFound):
            await state.store.delete_token(decode_spec(previous).node_token_id)
    return node_token


def _node_token(join_token: TokenRecord, now: float) -> tuple[str, TokenRecord]:
    """A new node credential (the secret, shown once) and its record."""
    secret, token_id, digest = new_token()
    record = TokenRecord(
        id=token_id,
        mesh=join_token.mesh,
        kind="node",
        digest=digest,
        services=join_token.services,
        created_at=now,
    )
    return secret, record


async def _existing(state: CentralState, mesh: str, name: str) -> DataplaneRecord | None:
    try:
        return await state.store.get_dataplane(mesh, name)
    except NotFound:
        return None


async def _mesh_ca(state: CentralState, mesh: str) -> tuple[PemPair, str]:
    """The mesh's signing CA (unsealed) and its trust bundle (PEM)."""
    record = await state.store.get_mesh(mesh)
    return signing_pair(record, state.seal_key), trust_bundle(decode_mesh_spec(record))


def _sign(
    state: CentralState,
    ca: PemPair,
    csrs: dict[str, str],
    *,
    mesh: str,
    allowed: tuple[str, ...],
    now: float,
) -> Signed:
    return sign_csrs(
        ca,
        csrs,
        mesh=mesh,
        allowed=allowed,
        now=datetime.fromtimestamp(now, UTC),
        ttl=timedelta(seconds=state.cert_ttl_seconds),
    )


# ---------------------------------------------------------------- with a node credential


async def _node(
    request: Request, state: CentralState
) -> tuple[str, str, TokenRecord, DataplaneRecord]:
    mesh = request.path_params["mesh"]
    name = request.path_params["name"]
    token, record = await authenticate_node(
        state.store, request.headers.get("authorization"), mesh=mesh, name=name
    )
    return mesh, name, token, record


async def renew(request: Request, state: CentralState) -> Response:
    """POST /v1/dataplanes/{mesh}/{name}/certificates: new certificates for new keys."""
    mesh, name, token, record = await _node(request, state)
    body = await json_body(request, state, RenewRequest)
    check_renewal(body.csrs, mesh=mesh, allowed=token.services)
    ca, bundle = await _mesh_ca(state, mesh)
    issuer = ca_fingerprint(ca.cert_pem)
    now = state.clock()
    signed = _sign(state, ca, body.csrs, mesh=mesh, allowed=token.services, now=now)
    not_after = signed.not_after
    issuers: tuple[str, ...] = (issuer,)
    if not set(record.services) <= set(body.csrs):  # some old ones live on
        if record.cert_not_after is not None:
            not_after = min(not_after, record.cert_not_after)
        issuers = tuple(sorted({issuer, *record.cert_issuers}))
    await state.store.update_dataplane_status(
        mesh,
        name,
        applied_version=record.applied_version,
        last_seen=now,
        cert_not_after=not_after,
        cert_issuers=issuers,
    )
    services = ",".join(sorted(body.csrs))
    await audit(
        state,
        token.id,
        "dataplane.renew",
        mesh=mesh,
        target=f"dataplane {name}",
        detail=f"services={services}",
    )
    log.info("certificates renewed", mesh=mesh, dataplane=name, services=services, ca=short(issuer))
    return struct_response(Certificates(certificates=signed.certificates, ca_bundle=bundle))


async def update(request: Request, state: CentralState) -> Response:
    """PUT /v1/dataplanes/{mesh}/{name}: new listeners after an agent.toml change; 204.

    The mesh revision goes up, so every dataplane's catalog and routes follow."""
    mesh, name, token, record = await _node(request, state)
    body = await json_body(request, state, DataplaneUpdate)
    check_update(body, mesh=mesh, name=name, identities_now=record.services)
    changed = updated_dataplane(record, body)
    if changed != record:
        await state.store.put_dataplane(changed)
        await audit(
            state,
            token.id,
            "dataplane.update",
            mesh=mesh,
            target=f"dataplane {name}",
            detail=f"node={body.node} address={body.address}",
        )
        log.info("dataplane updated", mesh=mesh, dataplane=name, address=body.address)
    return Response(status_code=204)


def poll_parameters(request: Request) -> tuple[int, float]:
    """``after`` (default 0) and ``wait`` (default DEFAULT_WAIT_SECONDS) of a long poll.

    Raises:
        ApiError: 400, naming the parameter.
    """
    after = parse_count("after", request.query_params.get("after", "0"), maximum=_MAX_VERSION)
    text = request.query_params.get("wait")
    if text is None:
        return after, DEFAULT_WAIT_SECONDS
    try:
        wait = float(text)
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= MAX_WAIT_SECONDS:
        raise ApiError(400, f"wait: must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}")
    return after, wait


async def get_config(request: Request, state: CentralState) -> Response:
    """GET /v1/dataplanes/{mesh}/{name}/config: wait for a change, then the config."""
    mesh, name, token, _ = await _node(request, state)
    after, wait = poll_parameters(request)
    revision = await state.store.wait_for_change(mesh, after, wait)
    # Read after the revision: the config may be newer than its version, never older.
    try:
        mesh_record = await state.store.get_mesh(mesh)
    except NotFound:
        raise _not_valid(mesh, name) from None
    policies = await state.store.list_policies(mesh)
    dataplanes = await state.store.list_dataplanes(mesh)
    current = next((d for d in dataplanes if d.name == name), None)
    if current is None or decode_spec(current).node_token_id != token.id:
        raise _not_valid(mesh, name)  # deleted or replaced while it waited
    compiled = compile_config(
        mesh_record,
        revision=revision,
        policies=policies,
        dataplane=current,
        dataplanes=dataplanes,
        heartbeat_seconds=state.heartbeat_seconds,
        rotation_spread_seconds=state.rotation_spread_seconds,
    )
    for problem in compiled.skipped:
        state.warn_once("stored policy left out of configs", problem, mesh=mesh)
    return struct_response(compiled.config)


def _not_valid(mesh: str, name: str) -> Unauthenticated:
    return Unauthenticated(f"this node credential is not valid for dataplane {name} in mesh {mesh}")


async def put_status(request: Request, state: CentralState) -> Response:
    """PUT /v1/dataplanes/{mesh}/{name}/status: a heartbeat; 204."""
    mesh, name, _, record = await _node(request, state)
    body = await json_body(request, state, StatusReport)
    if not 0 <= body.applied_version <= _MAX_VERSION:
        raise ApiError(400, f"applied_version: must be a whole number from 0 to {_MAX_VERSION}")
    if body.cert_not_after is not None and not math.isfinite(body.cert_not_after):
        raise ApiError(400, "cert_not_after: must be seconds since the epoch, or null")
    issuers = None if body.cert_issuers is None else check_issuers(body.cert_issuers)
    unhealthy = None if body.unhealthy is None else reported_unhealthy(record, body.unhealthy)
    last_error = ""
    if body.state == "rejected":
        last_error = one_line(body.error) or "rejected without a reason"
        if last_error != record.last_error:
            log.warning(
                "dataplane rejected its config",
                mesh=mesh,
                dataplane=name,
                applied_version=body.applied_version,
                error=last_error,
            )
    if record.offline:
        log.info(
            "dataplane back online: its endpoints return to the built-in catalog",
            mesh=mesh,
            dataplane=name,
        )
    if body.state == "applied" and record.last_error:
        log.info(
            "dataplane applied a config again",
            mesh=mesh,
            dataplane=name,
            applied_version=body.applied_version,
        )
    await state.store.update_dataplane_status(
        mesh,
        name,
        applied_version=body.applied_version,
        last_seen=state.clock(),
        cert_not_after=(
            record.cert_not_after if body.cert_not_after is None else body.cert_not_after
        ),
        last_error=last_error,
        cert_issuers=issuers,
        unhealthy=unhealthy,
    )
    if unhealthy is not None and unhealthy != record.unhealthy:
        await _log_health_change(state, record, unhealthy)
    return Response(status_code=204)


def reported_unhealthy(record: DataplaneRecord, reported: list[str]) -> tuple[str, ...]:
    """The reported unhealthy services that are inbound services of ``record``,
    sorted, without repeats (others are dropped: an agent.toml change may reach the
    central agent after a report). Pure."""
    inbound = {i.service for i in decode_spec(record).inbounds}
    return tuple(sorted(set(reported) & inbound))


async def _log_health_change(
    state: CentralState, record: DataplaneRecord, unhealthy: tuple[str, ...]
) -> None:
    sick = sorted(set(unhealthy) - set(record.unhealthy))
    well = sorted(set(record.unhealthy) - set(unhealthy))
    mesh, name = record.mesh, record.name
    if sick:
        log.warning(
            "services unhealthy: they leave the built-in catalog",
            mesh=mesh,
            dataplane=name,
            services=",".join(sick),
        )
    if well:
        log.info(
            "services healthy again: they return to the built-in catalog",
            mesh=mesh,
            dataplane=name,
            services=",".join(well),
        )
    if sick:
        panicking = panicking_services(sick, await state.store.list_dataplanes(mesh))
        if panicking:
            log.warning(
                "every endpoint of a service is unhealthy; the built-in catalog keeps "
                "them all (panic)",
                mesh=mesh,
                services=",".join(panicking),
            )


def check_issuers(issuers: list[str]) -> tuple[str, ...]:
    """The reported CA fingerprints, sorted and without repeats; "" (a certificate of
    no CA in the bundle) is kept: it is not the current CA either.

    Raises:
        ApiError: 400 unless each is "" or 64 lowercase hex digits, at most 64 of them.
    """
    if len(issuers) > MAX_ISSUERS or not all(i == "" or _FINGERPRINT.fullmatch(i) for i in issuers):
        raise ApiError(
            400,
            f"cert_issuers: must be at most {MAX_ISSUERS} SHA-256 fingerprints "
            "(64 lowercase hex digits)",
        )
    return tuple(sorted(set(issuers)))


def one_line(text: str) -> str:
    """``text`` on one line (whitespace runs become one space), at most MAX_ERROR_CHARS."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


__all__ = [
    "DEFAULT_WAIT_SECONDS",
    "MAX_ERROR_CHARS",
    "get_config",
    "join",
    "one_line",
    "poll_parameters",
    "put_status",
    "renew",
    "reported_unhealthy",
]

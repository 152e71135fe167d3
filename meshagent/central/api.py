"""The central agent's HTTP/JSON API (Starlette, served by hypercorn over TLS).

Admin endpoints (``Authorization: Bearer <admin token>``)::

    GET    /v1/openapi.json                         this API as an OpenAPI 3 document (no token)
    GET    /v1/meshes                               meshes the caller may see
    POST   /v1/meshes                               create a mesh (global admins)
    GET    /v1/meshes/{mesh}                        one mesh, with its CA certificate
    PATCH  /v1/meshes/{mesh}                        change ``mtls`` and/or ``default_allow``
    DELETE /v1/meshes/{mesh}                        delete a mesh (global admins)
    GET    /v1/meshes/{mesh}/ca-rotation            the CA rotation: its phase, who lags
    POST   /v1/meshes/{mesh}/ca-rotation            start one: both CAs trusted, the old one
                                                    signs until every online dataplane
                                                    has the new bundle (then the new one)
    POST   /v1/meshes/{mesh}/ca-rotation/finish     drop the previous CA (409 while online
                                                    dataplanes still use it, unless forced)
    POST   /v1/meshes/{mesh}/tokens                 a join token (shown once)
    GET    /v1/meshes/{mesh}/tokens                 its usable tokens (never the secrets)
    DELETE /v1/meshes/{mesh}/tokens/{id}            revoke one
    POST   /v1/tokens/admin                         a mesh-scoped admin token (global admins)
    GET    /v1/meshes/{mesh}/policies               the mesh's policies
    PUT    /v1/meshes/{mesh}/policies               apply a TOML/JSON document, all or nothing
    DELETE /v1/meshes/{mesh}/policies/{kind}/{name} delete one policy
    GET    /v1/meshes/{mesh}/audit                  the mesh's audit trail, newest first
    GET    /v1/meshes/{mesh}/dataplanes             dataplanes: online, versions, expiry, errors
    DELETE /v1/meshes/{mesh}/dataplanes/{name}      a dataplane and its node credential

Dataplane endpoints (agents; ``central.dataplane_api``, messages in ``snapshot.wire``)::

    POST   /v1/join                                 join with a join token -> 201
    POST   /v1/dataplanes/{mesh}/{name}/certificates  renew (node credential)
    GET    /v1/dataplanes/{mesh}/{name}/config      long poll: ?after=<version>&wait=<s>
    PUT    /v1/dataplanes/{mesh}/{name}/status      heartbeat -> 204
    PUT    /v1/dataplanes/{mesh}/{name}             new listeners, same identities -> 204

Theory of operation:

* Admin endpoints authenticate an admin token (``central.auth.authenticate``). A mesh
  the caller may not see answers 404, as if it did not exist. Dataplane endpoints
  authenticate a join token or a node credential themselves; what they cannot use is
  401, the same line whether or not the mesh or dataplane exists.
* Every error is JSON ``{"error": "<one line>"}`` (plus ``problems`` for invalid
  policies) with its status: 400 bad request, 401 no or bad token, 403 not allowed
  (a global admin's action; a service or mesh a token does not grant), 404, 409
  conflict, 413 body over ``max_body_bytes``, 415 unknown content type, 503 store
  unavailable, 500 a bug (logged; the client sees one line, never a traceback).
  Errors are translated once, in ``central.web.guarded``.
* Every change appends an audit entry: actor (token id), action, mesh, target.
* Bodies are read through ``central.web.read_body``, which refuses more than
  ``max_body_bytes`` (from Content-Length, or while streaming when there is none).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, Final

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshagent.central import dataplane_api
from meshagent.central.auth import Principal, admin_token_record, authenticate
from meshagent.central.dataplanes import dataplane_view, decode_spec, is_online, online_window
from meshagent.central.jobs import record_bundle_revision
from meshagent.central.meshes import (
    CaKind,
    MtlsMode,
    RotationConflict,
    check_mesh_name,
    finish_rotation,
    mesh_view,
    new_mesh,
    plan_apply,
    policy_records,
    policy_view,
    rotation_phase,
    rotation_view,
    start_rotation,
    with_settings,
)
from meshagent.central.meshes import decode_spec as decode_mesh_spec
from meshagent.central.store import DataplaneRecord, NotFound, TokenRecord
from meshagent.central.web import (
    JSON,
    ApiError,
    CentralState,
    audit,
    error_response,
    guarded,
    json_body,
    log,
    media_type,
    parse_count,
    read_body,
)
from meshagent.config.load import Duration
from meshagent.pki.identity import NAME_RULE, is_valid_name
from meshagent.pki.rotation import ca_fingerprint, short
from meshagent.pki.secrets import new_token
from meshagent.policy.load import PolicyError, load_document
from meshagent.policy.model import KINDS
from meshagent.snapshot.wire import (
    MAX_WAIT_SECONDS,
    Certificates,
    DataplaneConfig,
    DataplaneUpdate,
    JoinRequest,
    JoinResponse,
    RenewRequest,
    StatusReport,
)

MAX_AUDIT_ENTRIES: Final = 1000
_JSON = JSON
_TOML = "application/toml"


# ---------------------------------------------------------------------------- request bodies


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class MeshCreate(_Strict, frozen=True, kw_only=True):
    name: str
    mtls: MtlsMode = "strict"
    default_allow: bool = True  # False: strict; only what a TrafficPermission allows
    ca: CaKind = "builtin"
    ca_cert: str | None = None
    ca_key: str | None = None


class MeshPatch(_Strict, frozen=True, kw_only=True):
    """At least one of the two; what is not named stays as it is."""

    mtls: MtlsMode | None = None
    default_allow: bool | None = None


class CaRotationStart(_Strict, frozen=True, kw_only=True):
    """The new CA: made by the central agent (builtin) or the operator's (provided)."""

    ca: CaKind = "builtin"
    ca_cert: str | None = None
    ca_key: str | None = None


class CaRotationFinish(_Strict, frozen=True, kw_only=True):
    # True: finish even while online dataplanes still use certificates of the previous
    # CA (they cannot talk to the others until they renew).
    force: bool = False


class JoinTokenCreate(_Strict, frozen=True, kw_only=True):
    services: list[str]
    ttl: Duration | None = None  # default: join_token_ttl of central.toml
    uses: int = 1


class AdminTokenCreate(_Strict, frozen=True, kw_only=True):
    meshes: list[str]
    ttl: Duration | None = None  # default: never expires


# ---------------------------------------------------------------------------- plumbing


Handler = Callable[[Request, CentralState, Principal], Awaitable[Response]]


def _endpoint(state: CentralState, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """An admin endpoint: authenticate an admin token, run ``handler``, answer errors."""

    async def endpoint(request: Request) -> Response:
        principal = await authenticate(
            state.store, request.headers.get("authorization"), now=state.clock()
        )
        return await handler(request, state, principal)

    return guarded(endpoint)


def _agent_endpoint(
    state: CentralState, handler: Callable[[Request, CentralState], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """A dataplane API endpoint: ``handler`` authenticates the agent itself."""

    async def endpoint(request: Request) -> Response:
        return await handler(request, state)

    return guarded(endpoint)


async def _visible_mesh(state: CentralState, principal: Principal, mesh: str) -> None:
    """404 unless ``mesh`` exists and the caller may see it."""
    if not principal.can_see(mesh):
        raise ApiError(404, f"mesh {mesh} not found")
    await state.store.get_mesh(mesh)


def _require_global(principal: Principal, action: str) -> None:
    if not principal.is_global:
        raise ApiError(403, f"only a global admin token may {action}")


async def _audit(
    state: CentralState,
    principal: Principal,
    action: str,
    *,
    mesh: str | None,
    target: str,
    detail: str = "",
) -> None:
    await audit(state, principal.token_id, action, mesh=mesh, target=target, detail=detail)


# ---------------------------------------------------------------------------- meshes


async def list_meshes(request: Request, state: CentralState, principal: Principal) -> Response:
    meshes = [m for m in await state.store.list_meshes() if principal.can_see(m.name)]
    return JSONResponse({"meshes": [mesh_view(m, with_ca_cert=False) for m in meshes]})


async def create_mesh(request: Request, state: CentralState, principal: Principal) -> Response:
    _require_global(principal, "create meshes")
    body = await json_body(request, state, MeshCreate)
    record = new_mesh(
        body.name,
        mtls=body.mtls,
        ca=body.ca,
        seal_key=state.seal_key,
        now=state.clock(),
        ca_cert=body.ca_cert,
        ca_key=body.ca_key,
        default_allow=body.default_allow,
    )
    stored = await state.store.create_mesh(record)
    await _audit(
        state,
        principal,
        "mesh.create",
        mesh=body.name,
        target=f"mesh {body.name}",
        detail=f"mtls={body.mtls} default_allow={str(body.default_allow).lower()} ca={body.ca}",
    )
    log.info("mesh created", mesh=body.name, ca=body.ca, actor=principal.token_id)
    return JSONResponse(mesh_view(stored, with_ca_cert=True), status_code=201)


async def get_mesh(request: Request, state: CentralState, principal: Principal) -> Response:
    mesh = request.path_params["mesh"]
    if not principal.can_see(mesh):
        raise ApiError(404, f"mesh {mesh} not found")
    return JSONResponse(mesh_view(await state.store.get_mesh(mesh), with_ca_cert=True))


async def patch_mesh(request: Request, state: CentralState, principal: Principal) -> Response:
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    body = await json_body(request, state, MeshPatch)
    changes = {
        key: str(value).lower() if isinstance(value, bool) else value
        for key, value in msgspec.structs.asdict(body).items()
        if value is not None
    }
    if not changes:
        raise ApiError(400, "request body: name mtls and/or default_allow to change")
    current = await state.store.get_mesh(mesh)
    changed = with_settings(current, mtls=body.mtls, default_allow=body.default_allow)
    stored = await state.store.update_mesh(changed, expected_version=current.version)
    await _audit(
        state,
        principal,
        "mesh.update",
        mesh=mesh,
        target=f"mesh {mesh}",
        detail=" ".join(f"{key}={value}" for key, value in changes.items()),
    )
    return JSONResponse(mesh_view(stored, with_ca_cert=True))


async def delete_mesh(request: Request, state: CentralState, principal: Principal) -> Response:
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    _require_global(principal, "delete meshes")
    await state.store.delete_mesh(mesh)
    await _audit(state, principal, "mesh.delete", mesh=mesh, target=f"mesh {mesh}")
    return JSONResponse({"deleted": f"mesh {mesh}"})


# ---------------------------------------------------------------------------- CA rotation


def _online(state: CentralState) -> Callable[[DataplaneRecord], bool]:
    now = state.clock()
    within = online_window(state.heartbeat_seconds)
    return lambda record: is_online(record, now, within=within)


async def get_ca_rotation(request: Request, state: CentralState, principal: Principal) -> Response:
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    record = await state.store.get_mesh(mesh)
    dataplanes = await state.store.list_dataplanes(mesh)
    return JSONResponse(rotation_view(record, dataplanes, is_online=_online(state)))


async def start_ca_rotation(
    request: Request, state: CentralState, principal: Principal
) -> Response:
    """A new CA joins every trust bundle; the current one signs until the leader
    switches (``jobs.CaRotationSwitch``); dataplanes trust both until it finishes."""
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    body = await json_body(request, state, CaRotationStart)
    current = await state.store.get_mesh(mesh)
    try:
        rotated = start_rotation(
            current,
            ca=body.ca,
            seal_key=state.seal_key,
            now=state.clock(),
            ca_cert=body.ca_cert,
            ca_key=body.ca_key,
        )
    except RotationConflict as exc:
        raise ApiError(409, str(exc)) from None
    stored = await state.store.update_mesh(rotated, expected_version=current.version)
    # The revision from which configs carry the new bundle; the leader job records it
    # too, should this write not happen.
    stored = await record_bundle_revision(state.store, stored)
    dataplanes = await state.store.list_dataplanes(mesh)
    view = rotation_view(stored, dataplanes, is_online=_online(state))
    await _audit(
        state,
        principal,
        "mesh.ca_rotation.start",
        mesh=mesh,
        target=f"mesh {mesh}",
        detail=f"phase=distributing ca={body.ca} new={view['ca_fingerprint']} "
        f"previous={view['previous_ca_fingerprint']} (still signing) "
        f"bundle_version={view['bundle_revision']}",
    )
    log.info(
        "CA rotation started: distributing the new CA, the previous one still signs",
        mesh=mesh,
        ca=body.ca,
        new_ca=short(str(view["ca_fingerprint"])),
        bundle_version=view["bundle_revision"],
        actor=principal.token_id,
    )
    return JSONResponse(view, status_code=201)


async def finish_ca_rotation(
    request: Request, state: CentralState, principal: Principal
) -> Response:
    """Drop the previous CA from the trust bundle and its key from the store."""
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    body = await json_body(request, state, CaRotationFinish)
    current = await state.store.get_mesh(mesh)
    dataplanes = await state.store.list_dataplanes(mesh)
    online = _online(state)
    before = rotation_view(current, dataplanes, is_online=online)
    try:
        finished = finish_rotation(current, dataplanes, is_online=online, force=body.force)
    except RotationConflict as exc:
        raise ApiError(409, str(exc)) from None
    stored = await state.store.update_mesh(finished, expected_version=current.version)
    behind = before["still_on_previous_ca"]
    assert isinstance(behind, list)
    detail = f"previous={before['previous_ca_fingerprint']} dropped"
    if behind:
        detail += f" forced; still on it: {','.join(behind)}"
    await _audit(
        state, principal, "mesh.ca_rotation.finish", mesh=mesh, target=f"mesh {mesh}", detail=detail
    )
    log.info(
        "CA rotation finished",
        mesh=mesh,
        forced=bool(behind),
        left_behind=len(behind),
        actor=principal.token_id,
    )
    view = rotation_view(stored, dataplanes, is_online=online)
    view["left_behind"] = behind
    return JSONResponse(view)


# ---------------------------------------------------------------------------- tokens


async def create_join_token(
    request: Request, state: CentralState, principal: Principal
) -> Response:
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    body = await json_body(request, state, JoinTokenCreate)
    if not body.services:
        raise ApiError(400, "services: name at least one service the token may join as")
    for service in body.services:
        if not is_valid_name(service):
            raise ApiError(400, f'services: invalid service name "{service}": use {NAME_RULE}')
    if body.uses < 1:
        raise ApiError(400, "uses: must be at least 1")
    ttl = state.join_token_ttl_seconds if body.ttl is None else float(body.ttl)
    if ttl <= 0:
        raise ApiError(400, 'ttl: must be more than 0, e.g. "1h"')
    now = state.clock()
    token, token_id, digest = new_token()
    record = TokenRecord(
        id=token_id,
        mesh=mesh,
        kind="join",
        digest=digest,
        services=tuple(sorted(set(body.services))),
        expires_at=now + ttl,
        uses_left=body.uses,
        created_at=now,
    )
    await state.store.create_token(record)
    await _audit(
        state,
        principal,
        "token.create",
        mesh=mesh,
        target=f"token {token_id}",
        detail=f"join services={','.join(record.services)} uses={body.uses}",
    )
    return JSONResponse(
        {
            "token": token,
            "id": token_id,
            "kind": "join",
            "mesh": mesh,
            "services": list(record.services),
            "expires_at": record.expires_at,
            "uses": body.uses,
        },
        status_code=201,
    )


async def create_admin_token(
    request: Request, state: CentralState, principal: Principal
) -> Response:
    _require_global(principal, "create admin tokens")
    body = await json_body(request, state, AdminTokenCreate)
    if not body.meshes:
        raise ApiError(400, "meshes: name at least one mesh the token may manage")
    for mesh in body.meshes:
        check_mesh_name(mesh)
        await state.store.get_mesh(mesh)
    if body.ttl is not None and body.ttl <= 0:
        raise ApiError(400, 'ttl: must be more than 0, e.g. "720h"')
    now = state.clock()
    token, token_id, digest = new_token()
    meshes = tuple(sorted(set(body.meshes)))
    expires_at = None if body.ttl is None else now + float(body.ttl)
    await state.store.create_token(
        admin_token_record(token_id, digest, meshes=meshes, now=now, expires_at=expires_at)
    )
    for mesh in meshes:
        await _audit(
            state,
            principal,
            "token.create",
            mesh=mesh,
            target=f"token {token_id}",
            detail=f"admin meshes={','.join(meshes)}",
        )
    return JSONResponse(
        {
            "token": token,
            "id": token_id,
            "kind": "admin",
            "meshes": list(meshes),
            "expires_at": expires_at,
        },
        status_code=201,
    )


def token_view(record: TokenRecord) -> dict[str, Any]:
    """A token as the API shows it: never its secret, nor the secret's digest."""
    return {
        "id": record.id,
        "kind": record.kind,
        "mesh": record.mesh,
        "services": list(record.services),
        "meshes": list(record.meshes),
        "expires_at": record.expires_at,
        "uses_left": record.uses_left,
        "created_at": record.created_at,
    }


def _mesh_tokens(
    records: list[TokenRecord], mesh: str, principal: Principal, now: float
) -> list[TokenRecord]:
    """The join tokens of ``mesh`` and, for global admins, the admin tokens scoped to it,
    still usable at ``now``. Node credentials belong to dataplanes (delete dataplane)."""

    def shown(record: TokenRecord) -> bool:
        if record.expires_at is not None and record.expires_at <= now:
            return False
        if record.kind == "join":
            return record.mesh == mesh
        return record.kind == "admin" and mesh in record.meshes and principal.is_global

    return sorted(filter(shown, records), key=lambda r: (r.created_at, r.id))


async def list_tokens(request: Request, state: CentralState, principal: Principal) -> Response:
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    records = await state.store.list_tokens()
    tokens = _mesh_tokens(records, mesh, principal, state.clock())
    return JSONResponse({"mesh": mesh, "tokens": [token_view(t) for t in tokens]})


async def revoke_token(request: Request, state: CentralState, principal: Principal) -> Response:
    """Delete a join token (or, for global admins, a mesh-scoped admin token) at once."""
    mesh, token_id = request.path_params["mesh"], request.path_params["id"]
    await _visible_mesh(state, principal, mesh)
    try:
        record = await state.store.get_token(token_id)
    except NotFound:
        record = None
    if record is None or not _mesh_tokens([record], mesh, principal, -math.inf):
        raise ApiError(404, f"token {token_id} not found in mesh {mesh}")
    await state.store.delete_token(token_id)
    await _audit(
        state,
        principal,
        "token.revoke",
        mesh=mesh,
        target=f"token {token_id}",
        detail=record.kind,
    )
    return JSONResponse({"revoked": f"token {token_id}"})


# ---------------------------------------------------------------------------- policies


async def list_policies(request: Request, state: CentralState, principal: Principal) -> Response:
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    kind = request.query_params.get("kind")
    policies = await state.store.list_policies(mesh, kind)
    return JSONResponse({"mesh": mesh, "policies": [policy_view(p) for p in policies]})


async def apply_policies(request: Request, state: CentralState, principal: Principal) -> Response:
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    media = media_type(request)
    suffixes = {_JSON: ".json", _TOML: ".toml", "text/toml": ".toml"}
    if media not in suffixes:
        raise ApiError(415, f"content type {media!r} is not accepted; send {_TOML} or {_JSON}")
    body = await read_body(request, state)
    try:
        resources = load_document(body, source=f"document{suffixes[media]}")
    except PolicyError as exc:
        raise ApiError(400, exc.summary(), exc.problems) from None
    now = state.clock()
    records, problems = policy_records(mesh, resources, now=now)
    if problems:
        problems = [f"document{suffixes[media]}: {p}" for p in problems]
        raise ApiError(400, problems[0], problems)
    plan = plan_apply(records, await state.store.list_policies(mesh))
    if plan.writes:
        await state.store.apply_policies(mesh, plan.writes, plan.expected_versions)
        for action, labels in (("policy.create", plan.created), ("policy.update", plan.updated)):
            for label in labels:
                await _audit(state, principal, action, mesh=mesh, target=f"policy {label}")
    return JSONResponse(
        {
            "mesh": mesh,
            "created": plan.created,
            "updated": plan.updated,
            "unchanged": plan.unchanged,
        }
    )


async def delete_policy(request: Request, state: CentralState, principal: Principal) -> Response:
    mesh = request.path_params["mesh"]
    kind = request.path_params["kind"]
    name = request.path_params["name"]
    await _visible_mesh(state, principal, mesh)
    if kind not in KINDS:
        raise ApiError(400, f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    await state.store.delete_policy(mesh, kind, name)
    await _audit(state, principal, "policy.delete", mesh=mesh, target=f"policy {kind}/{name}")
    return JSONResponse({"deleted": f"{kind}/{name}", "mesh": mesh})


# ---------------------------------------------------------------------------- audit


async def list_audit(request: Request, state: CentralState, principal: Principal) -> Response:
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    text = request.query_params.get("limit", "100")
    limit = parse_count("limit", text, maximum=MAX_AUDIT_ENTRIES)
    if limit < 1:
        raise ApiError(400, f"limit: must be a whole number from 1 to {MAX_AUDIT_ENTRIES}")
    entries = await state.store.list_audit(mesh, limit)
    return JSONResponse({"mesh": mesh, "entries": [msgspec.to_builtins(e) for e in entries]})


# ---------------------------------------------------------------------------- dataplanes


async def list_dataplanes(request: Request, state: CentralState, principal: Principal) -> Response:
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    latest = await state.store.mesh_revision(mesh)
    records = await state.store.list_dataplanes(mesh)
    now = state.clock()
    within = online_window(state.heartbeat_seconds)
    mesh_spec = decode_mesh_spec(await state.store.get_mesh(mesh))
    current_ca = ca_fingerprint(mesh_spec.ca_cert)
    phase = rotation_phase(mesh_spec)
    bundle_revision = mesh_spec.bundle_revision if phase == "distributing" else None
    views = [
        dataplane_view(
            r,
            now=now,
            latest_version=latest,
            within=within,
            current_ca=current_ca,
            bundle_revision=bundle_revision,
        )
        for r in records
    ]
    return JSONResponse(
        {
            "mesh": mesh,
            "latest_version": latest,
            "ca_fingerprint": current_ca,
            "ca_rotating": bool(mesh_spec.previous_ca_cert),
            "ca_rotation_phase": phase,
            "dataplanes": views,
        }
    )


async def delete_dataplane(request: Request, state: CentralState, principal: Principal) -> Response:
    mesh = request.path_params["mesh"]
    name = request.path_params["name"]
    await _visible_mesh(state, principal, mesh)
    record = await state.store.get_dataplane(mesh, name)
    token_id = decode_spec(record).node_token_id
    # The record first: without it the credential opens nothing, even if its own
    # deletion fails.
    await state.store.delete_dataplane(mesh, name)
    with suppress(NotFound):
        await state.store.delete_token(token_id)
    await _audit(
        state,
        principal,
        "dataplane.delete",
        mesh=mesh,
        target=f"dataplane {name}",
        detail=f"node credential {token_id} deleted",
    )
    log.info("dataplane deleted", mesh=mesh, dataplane=name, actor=principal.token_id)
    return JSONResponse({"deleted": f"dataplane {name}", "mesh": mesh})


# ---------------------------------------------------------------------------- the app


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail).lower())


def create_app(state: CentralState) -> Starlette:
    """The API as an ASGI app over ``state``."""

    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, _endpoint(state, handler), methods=[method])

    def agent(
        path: str, handler: Callable[[Request, CentralState], Awaitable[Response]], method: str
    ) -> Route:
        return Route(path, _agent_endpoint(state, handler), methods=[method])

    dataplane = "/v1/dataplanes/{mesh}/{name}"

    routes = [
        Route("/v1/openapi.json", openapi, methods=["GET"]),
        route("/v1/meshes", list_meshes, "GET"),
        route("/v1/meshes", create_mesh, "POST"),
        route("/v1/meshes/{mesh}", get_mesh, "GET"),
        route("/v1/meshes/{mesh}", patch_mesh, "PATCH"),
        route("/v1/meshes/{mesh}", delete_mesh, "DELETE"),
        route("/v1/meshes/{mesh}/ca-rotation", get_ca_rotation, "GET"),
        route("/v1/meshes/{mesh}/ca-rotation", start_ca_rotation, "POST"),
        route("/v1/meshes/{mesh}/ca-rotation/finish", finish_ca_rotation, "POST"),
        route("/v1/meshes/{mesh}/tokens", create_join_token, "POST"),
        route("/v1/meshes/{mesh}/tokens", list_tokens, "GET"),
        route("/v1/meshes/{mesh}/tokens/{id}", revoke_token, "DELETE"),
        route("/v1/tokens/admin", create_admin_token, "POST"),
        route("/v1/meshes/{mesh}/policies", list_policies, "GET"),
        route("/v1/meshes/{mesh}/policies", apply_policies, "PUT"),
        route("/v1/meshes/{mesh}/policies/{kind}/{name}", delete_policy, "DELETE"),
        route("/v1/meshes/{mesh}/audit", list_audit, "GET"),
        route("/v1/meshes/{mesh}/dataplanes", list_dataplanes, "GET"),
        route("/v1/meshes/{mesh}/dataplanes/{name}", delete_dataplane, "DELETE"),
        agent("/v1/join", dataplane_api.join, "POST"),
        agent(f"{dataplane}/certificates", dataplane_api.renew, "POST"),
        agent(f"{dataplane}/config", dataplane_api.get_config, "GET"),
        agent(f"{dataplane}/status", dataplane_api.put_status, "PUT"),
        agent(dataplane, dataplane_api.update, "PUT"),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


# ---------------------------------------------------------------------------- OpenAPI


_ERROR_REF: Final = {"$ref": "#/components/schemas/Error"}


def _op(
    summary: str,
    status: str = "200",
    body: str | None = None,
    *,
    auth: bool = True,
    params: tuple[str, ...] = (),
    answer: str | None = None,
    query: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    success: dict[str, Any] = {"description": "success"}
    if answer is not None:
        success["content"] = {_JSON: {"schema": {"$ref": f"#/components/schemas/{answer}"}}}
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            status: success,
            "default": {"description": "error", "content": {_JSON: {"schema": _ERROR_REF}}},
        },
    }
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    if not auth:
        op["security"] = []
    parameters = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in (query or {}).items()
    ]
    if parameters:
        op["parameters"] = parameters
    return op


def _duration_schema(type_: type) -> dict[str, Any]:
    if type_ is Duration:
        return {"type": "string", "description": 'a duration with a unit: "90s", "1h", "7d"'}
    raise NotImplementedError


def _schemas(*structs: type[msgspec.Struct]) -> dict[str, Any]:
    """The schemas of ``structs`` and of every type they refer to, by name."""
    _, components = msgspec.json.schema_components(
        structs, schema_hook=_duration_schema, ref_template="#/components/schemas/{name}"
    )
    return dict(components)


_M = ("mesh",)
_DP = ("mesh", "name")
_NODE: list[dict[str, list[str]]] = [{"bearer": []}]  # the node credential from the join
_POLL = {
    "after": {"type": "integer", "minimum": 0, "description": "the version the agent has"},
    "wait": {
        "type": "number",
        "minimum": 0,
        "maximum": MAX_WAIT_SECONDS,
        "description": f"seconds to wait for another version (default "
        f"{dataplane_api.DEFAULT_WAIT_SECONDS:g})",
    },
}
_POLICY_DOC = {
    "description": "A policy document: kinds as keys, lists of resources",
    "type": "object",
}
OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.0.3",
    "info": {"title": "meshagent central agent API", "version": "1"},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {"type": "string"},
                    "problems": {"type": "array", "items": {"type": "string"}},
                },
            },
            **_schemas(
                MeshCreate,
                MeshPatch,
                CaRotationStart,
                CaRotationFinish,
                JoinTokenCreate,
                AdminTokenCreate,
                JoinRequest,
                JoinResponse,
                RenewRequest,
                Certificates,
                DataplaneConfig,
                StatusReport,
                DataplaneUpdate,
            ),
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/openapi.json": {"get": _op("This document", auth=False)},
        "/v1/meshes": {
            "get": _op("List meshes"),
            "post": _op("Create a mesh", "201", "MeshCreate"),
        },
        "/v1/meshes/{mesh}": {
            "get": _op("Get a mesh", params=_M),
            "patch": _op("Change mtls and/or default_allow", body="MeshPatch", params=_M),
            "delete": _op("Delete a mesh", params=_M),
        },
        "/v1/meshes/{mesh}/ca-rotation": {
            "get": _op(
                "The mesh's CA rotation: its phase, dataplanes without the new bundle or "
                "still on the old CA",
                params=_M,
            ),
            "post": _op(
                "Rotate the mesh's CA: dataplanes trust both; the new one signs once every "
                "online dataplane has it",
                "201",
                "CaRotationStart",
                params=_M,
            ),
        },
        "/v1/meshes/{mesh}/ca-rotation/finish": {
            "post": _op(
                "Finish a CA rotation: drop the previous CA (409 while online dataplanes use it)",
                body="CaRotationFinish",
                params=_M,
            )
        },
        "/v1/meshes/{mesh}/tokens": {
            "post": _op("Create a join token", "201", "JoinTokenCreate", params=_M),
            "get": _op("List the mesh's usable tokens (never their secrets)", params=_M),
        },
        "/v1/meshes/{mesh}/tokens/{id}": {
            "delete": _op("Revoke a token of the mesh", params=("mesh", "id"))
        },
        "/v1/tokens/admin": {
            "post": _op("Create a mesh-scoped admin token", "201", "AdminTokenCreate")
        },
        "/v1/meshes/{mesh}/policies": {
            "get": _op("List policies", params=_M),
            "put": {
                **_op("Apply a policy document (all or nothing)", params=_M),
                "requestBody": {
                    "required": True,
                    "content": {
                        _TOML: {"schema": {"type": "string"}},
                        _JSON: {"schema": _POLICY_DOC},
                    },
                },
            },
        },
        "/v1/meshes/{mesh}/policies/{kind}/{name}": {
            "delete": _op("Delete a policy", params=("mesh", "kind", "name"))
        },
        "/v1/meshes/{mesh}/audit": {"get": _op("The mesh's audit trail", params=_M)},
        "/v1/meshes/{mesh}/dataplanes": {
            "get": _op("List dataplanes with their status", params=_M)
        },
        "/v1/meshes/{mesh}/dataplanes/{name}": {
            "delete": _op("Delete a dataplane and its node credential", params=_DP)
        },
        "/v1/join": {
            "post": {
                **_op(
                    "Join a mesh (Bearer: a join token)",
                    "201",
                    "JoinRequest",
                    answer="JoinResponse",
                ),
                "security": [{"bearer": []}],
            }
        },
        "/v1/dataplanes/{mesh}/{name}/certificates": {
            "post": {
                **_op("Renew certificates", body="RenewRequest", params=_DP, answer="Certificates"),
                "security": _NODE,
            }
        },
        "/v1/dataplanes/{mesh}/{name}/config": {
            "get": {
                **_op(
                    "The dataplane's config (a long poll)",
                    params=_DP,
                    answer="DataplaneConfig",
                    query=_POLL,
                ),
                "security": _NODE,
            }
        },
        "/v1/dataplanes/{mesh}/{name}/status": {
            "put": {**_op("Report status", "204", "StatusReport", params=_DP), "security": _NODE}
        },
        "/v1/dataplanes/{mesh}/{name}": {
            "put": {
                **_op("Change listeners (same identities)", "204", "DataplaneUpdate", params=_DP),
                "security": _NODE,
            }
        },
    },
}


__all__ = [
    "MAX_AUDIT_ENTRIES",
    "OPENAPI",
    "ApiError",
    "CentralState",
    "create_app",
]

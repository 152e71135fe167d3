"""The central agent's admin HTTP/JSON API (Starlette, served by hypercorn over TLS).

    GET    /v1/openapi.json                         this API as an OpenAPI 3 document
    GET    /v1/meshes                               meshes the caller may see
    POST   /v1/meshes                               create a mesh (global admins)
    GET    /v1/meshes/{mesh}                        one mesh, with its CA certificate
    PATCH  /v1/meshes/{mesh}                        change ``mtls`` and/or ``default_allow``
    DELETE /v1/meshes/{mesh}                        delete a mesh (global admins)
    POST   /v1/meshes/{mesh}/tokens                 a join token (shown once)
    POST   /v1/tokens/admin                         a mesh-scoped admin token (global admins)
    GET    /v1/meshes/{mesh}/policies               the mesh's policies
    PUT    /v1/meshes/{mesh}/policies               apply a TOML/JSON document, all or nothing
    DELETE /v1/meshes/{mesh}/policies/{kind}/{name} delete one policy
    GET    /v1/meshes/{mesh}/audit                  the mesh's audit trail, newest first

Theory of operation:

* Every endpoint but the OpenAPI document needs ``Authorization: Bearer <admin token>``
  (``central.auth``). A mesh the caller may not see answers 404, as if it did not exist.
* Every error is JSON ``{"error": "<one line>"}`` (plus ``problems`` for invalid
  policies) with its status: 400 bad request, 401 no or bad token, 403 a global admin's
  action, 404, 409 conflict, 413 body over ``max_body_bytes``, 415 unknown content type,
  503 store unavailable, 500 a bug (logged here; the client sees one line, never a
  traceback). Store errors are translated once, in ``_endpoint``.
* Every change appends an audit entry: actor (token id), action, mesh, target.
* Bodies are read through ``_read_body``, which refuses more than ``max_body_bytes``
  (from Content-Length, or while streaming when there is none).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshagent.central.auth import (
    Principal,
    Unauthenticated,
    admin_token_record,
    authenticate,
)
from meshagent.central.meshes import (
    CaKind,
    MeshError,
    MtlsMode,
    check_mesh_name,
    mesh_view,
    new_mesh,
    plan_apply,
    policy_records,
    policy_view,
    with_settings,
)
from meshagent.central.store import (
    AuditRecord,
    Conflict,
    NotFound,
    Store,
    StoreError,
    StoreUnavailable,
    TokenRecord,
)
from meshagent.config.load import ConfigError, Duration, convert
from meshagent.log import get_logger
from meshagent.pki.identity import NAME_RULE, is_valid_name
from meshagent.pki.secrets import new_token
from meshagent.policy.load import PolicyError, load_document
from meshagent.policy.model import KINDS

log = get_logger("central.api")

MAX_BODY_BYTES: Final = 1024 * 1024
MAX_AUDIT_ENTRIES: Final = 1000
_JSON = "application/json"
_T = TypeVar("_T")
_TOML = "application/toml"


@dataclass(frozen=True, slots=True)
class CentralState:
    """What the API works with. ``clock`` returns seconds since the epoch."""

    store: Store
    seal_key: bytes
    join_token_ttl_seconds: float
    max_body_bytes: int = MAX_BODY_BYTES
    clock: Callable[[], float] = field(default=time.time)


class ApiError(Exception):
    """An answer other than success; ``str()`` is the one-line error for the client."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problems = problems


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


class JoinTokenCreate(_Strict, frozen=True, kw_only=True):
    services: list[str]
    ttl: Duration | None = None  # default: join_token_ttl of central.toml
    uses: int = 1


class AdminTokenCreate(_Strict, frozen=True, kw_only=True):
    meshes: list[str]
    ttl: Duration | None = None  # default: never expires


# ---------------------------------------------------------------------------- plumbing


Handler = Callable[[Request, CentralState, Principal], Awaitable[Response]]


def _error(status: int, message: str, problems: list[str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if problems is not None:
        body["problems"] = problems
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _endpoint(state: CentralState, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate, run ``handler``, and turn every error into a JSON answer."""

    async def endpoint(request: Request) -> Response:
        try:
            principal = await authenticate(
                state.store, request.headers.get("authorization"), now=state.clock()
            )
            return await handler(request, state, principal)
        except Unauthenticated as exc:
            return _error(401, str(exc))
        except ApiError as exc:
            return _error(exc.status, str(exc), exc.problems)
        except NotFound as exc:
            return _error(404, str(exc))
        except Conflict as exc:
            return _error(409, str(exc))
        except StoreUnavailable as exc:
            log.error("store unavailable", error=str(exc))
            return _error(503, "the central agent's store is unavailable; try again")
        except (StoreError, MeshError) as exc:
            return _error(400, str(exc))
        except Exception as exc:
            log.error(
                "request failed",
                method=request.method,
                path=request.url.path,
                error=f"{type(exc).__name__}: {exc}",
            )
            return _error(500, "internal error in the central agent (see its log)")

    return endpoint


async def _read_body(request: Request, state: CentralState) -> bytes:
    limit = state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; at most {limit} are accepted")
    chunks: list[bytes] = []
    size = 0
    async with aclosing(request.stream()) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over {limit} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json_body(request: Request, state: CentralState, type_: type[_T]) -> _T:
    media = _media_type(request)
    if media not in ("", _JSON):
        raise ApiError(415, f"content type {media!r} is not accepted; send {_JSON}")
    body = await _read_body(request, state)
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from None
    try:
        return convert(data, type_, source="request body")
    except ConfigError as exc:
        raise ApiError(400, str(exc)) from None


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
    await state.store.append_audit(
        AuditRecord(
            at=state.clock(),
            actor=principal.token_id,
            action=action,
            mesh=mesh,
            target=target,
            detail=detail,
        )
    )


# ---------------------------------------------------------------------------- meshes


async def list_meshes(request: Request, state: CentralState, principal: Principal) -> Response:
    meshes = [m for m in await state.store.list_meshes() if principal.can_see(m.name)]
    return JSONResponse({"meshes": [mesh_view(m, with_ca_cert=False) for m in meshes]})


async def create_mesh(request: Request, state: CentralState, principal: Principal) -> Response:
    _require_global(principal, "create meshes")
    body = await _json_body(request, state, MeshCreate)
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
    body = await _json_body(request, state, MeshPatch)
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


# ---------------------------------------------------------------------------- tokens


async def create_join_token(
    request: Request, state: CentralState, principal: Principal
) -> Response:
    mesh = request.path_params["mesh"]
    await _visible_mesh(state, principal, mesh)
    body = await _json_body(request, state, JoinTokenCreate)
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
    body = await _json_body(request, state, AdminTokenCreate)
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
    media = _media_type(request)
    suffixes = {_JSON: ".json", _TOML: ".toml", "text/toml": ".toml"}
    if media not in suffixes:
        raise ApiError(415, f"content type {media!r} is not accepted; send {_TOML} or {_JSON}")
    body = await _read_body(request, state)
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
    if not text.isdigit() or not 1 <= int(text) <= MAX_AUDIT_ENTRIES:
        raise ApiError(400, f"limit: must be a number from 1 to {MAX_AUDIT_ENTRIES}")
    entries = await state.store.list_audit(mesh, int(text))
    return JSONResponse({"mesh": mesh, "entries": [msgspec.to_builtins(e) for e in entries]})


# ---------------------------------------------------------------------------- the app


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail).lower())


def create_app(state: CentralState) -> Starlette:
    """The API as an ASGI app over ``state``."""

    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, _endpoint(state, handler), methods=[method])

    routes = [
        Route("/v1/openapi.json", openapi, methods=["GET"]),
        route("/v1/meshes", list_meshes, "GET"),
        route("/v1/meshes", create_mesh, "POST"),
        route("/v1/meshes/{mesh}", get_mesh, "GET"),
        route("/v1/meshes/{mesh}", patch_mesh, "PATCH"),
        route("/v1/meshes/{mesh}", delete_mesh, "DELETE"),
        route("/v1/meshes/{mesh}/tokens", create_join_token, "POST"),
        route("/v1/tokens/admin", create_admin_token, "POST"),
        route("/v1/meshes/{mesh}/policies", list_policies, "GET"),
        route("/v1/meshes/{mesh}/policies", apply_policies, "PUT"),
        route("/v1/meshes/{mesh}/policies/{kind}/{name}", delete_policy, "DELETE"),
        route("/v1/meshes/{mesh}/audit", list_audit, "GET"),
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
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            status: {"description": "success"},
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
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ]
    return op


def _duration_schema(type_: type) -> dict[str, Any]:
    if type_ is Duration:
        return {"type": "string", "description": 'a duration with a unit: "90s", "1h", "7d"'}
    raise NotImplementedError


def _schema(struct: type[msgspec.Struct]) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [struct], schema_hook=_duration_schema, ref_template="{name}"
    )
    schema: dict[str, Any] = components[struct.__name__]
    return schema


_M = ("mesh",)
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
            "MeshCreate": _schema(MeshCreate),
            "MeshPatch": _schema(MeshPatch),
            "JoinTokenCreate": _schema(JoinTokenCreate),
            "AdminTokenCreate": _schema(AdminTokenCreate),
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
        "/v1/meshes/{mesh}/tokens": {
            "post": _op("Create a join token", "201", "JoinTokenCreate", params=_M)
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
    },
}

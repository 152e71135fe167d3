"""What every endpoint of the central agent's API shares: its state, the translation of
errors into one-line JSON answers, bounded request bodies and the audit trail.

Theory of operation:

* ``guarded(handler)`` is the error boundary of one endpoint: every error becomes JSON
  ``{"error": "<one line>"}`` (plus ``problems`` for invalid policies) with its
  status; store errors and refusals are translated here, once. A bug answers 500 with
  one line and is logged with the request; the client never sees a traceback.
* Bodies are read through ``read_body``, which refuses more than ``max_body_bytes``
  (from Content-Length, or while streaming when there is none).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from meshagent.central.auth import Unauthenticated
from meshagent.central.dataplanes import HEARTBEAT_SECONDS, ROTATION_SPREAD_SECONDS
from meshagent.central.joining import BadRequest, Forbidden
from meshagent.central.meshes import MeshError
from meshagent.central.store import (
    AuditRecord,
    Conflict,
    NotFound,
    Store,
    StoreError,
    StoreUnavailable,
)
from meshagent.config.load import ConfigError, convert
from meshagent.log import get_logger

log = get_logger("central.api")

MAX_BODY_BYTES: Final = 1024 * 1024
DEFAULT_CERT_TTL_SECONDS: Final = 24 * 3600.0
# Distinct warnings about the same thing (a stored policy that no longer decodes) are
# logged once; the memory of what was logged is forgotten past this many.
MAX_REMEMBERED_WARNINGS: Final = 1000
JSON: Final = "application/json"
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class CentralState:
    """What the API works with. ``clock`` returns seconds since the epoch.

    ``cert_ttl_seconds``: the lifetime of the certificates it signs (central.toml
    ``cert_ttl``). ``heartbeat_seconds``: how often agents report (central.toml
    ``heartbeat_interval``). ``rotation_spread_seconds``: the window over which agents
    renew certificates of a CA that no longer signs (central.toml ``ca_rotation_spread``).
    ``warned``: warnings already logged (see ``warn_once``).
    """

    store: Store
    seal_key: bytes
    join_token_ttl_seconds: float
    max_body_bytes: int = MAX_BODY_BYTES
    clock: Callable[[], float] = field(default=time.time)
    cert_ttl_seconds: float = DEFAULT_CERT_TTL_SECONDS
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    rotation_spread_seconds: float = ROTATION_SPREAD_SECONDS
    warned: set[str] = field(default_factory=set)

    def warn_once(self, event: str, problem: str, **fields: object) -> None:
        """Log ``problem`` at warning level the first time it is seen."""
        if problem in self.warned:
            return
        if len(self.warned) >= MAX_REMEMBERED_WARNINGS:
            self.warned.clear()
        self.warned.add(problem)
        log.warning(event, problem=problem, **fields)


class ApiError(Exception):
    """An answer other than success; ``str()`` is the one-line error for the client."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problems = problems


def error_response(status: int, message: str, problems: list[str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if problems is not None:
        body["problems"] = problems
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def struct_response(value: msgspec.Struct, status: int = 200) -> Response:
    """A wire message (``snapshot.wire``) as its JSON."""
    return Response(msgspec.json.encode(value), status_code=status, media_type=JSON)


def guarded(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """``handler`` with every error turned into a JSON answer (see the module docstring)."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except Unauthenticated as exc:
            return error_response(401, str(exc))
        except ApiError as exc:
            return error_response(exc.status, str(exc), exc.problems)
        except Forbidden as exc:
            return error_response(403, str(exc))
        except BadRequest as exc:
            return error_response(400, str(exc))
        except NotFound as exc:
            return error_response(404, str(exc))
        except Conflict as exc:
            return error_response(409, str(exc))
        except StoreUnavailable as exc:
            log.error("store unavailable", error=str(exc))
            return error_response(503, "the central agent's store is unavailable; try again")
        except (StoreError, MeshError) as exc:
            return error_response(400, str(exc))
        except Exception as exc:
            log.error(
                "request failed",
                method=request.method,
                path=request.url.path,
                error=f"{type(exc).__name__}: {exc}",
            )
            return error_response(500, "internal error in the central agent (see its log)")

    return endpoint


async def read_body(request: Request, state: CentralState) -> bytes:
    """The request body, at most ``state.max_body_bytes`` (else ApiError 413)."""
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


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def json_body(request: Request, state: CentralState, type_: type[_T]) -> _T:
    """The JSON body decoded into ``type_``; ApiError 400/413/415 naming the field."""
    media = media_type(request)
    if media not in ("", JSON):
        raise ApiError(415, f"content type {media!r} is not accepted; send {JSON}")
    body = await read_body(request, state)
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from None
    try:
        return convert(data, type_, source="request body")
    except ConfigError as exc:
        raise ApiError(400, str(exc)) from None


def parse_count(name: str, text: str, *, maximum: int) -> int:
    """A query parameter that is a whole number from 0 to ``maximum`` (else ApiError 400)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) > maximum:
        raise ApiError(400, f"{name}: must be a whole number from 0 to {maximum}")
    return int(text)


async def audit(
    state: CentralState,
    actor: str,
    action: str,
    *,
    mesh: str | None,
    target: str,
    detail: str = "",
) -> None:
    """Append one audit entry; ``actor`` is the id of the token that acted."""
    await state.store.append_audit(
        AuditRecord(
            at=state.clock(),
            actor=actor,
            action=action,
            mesh=mesh,
            target=target,
            detail=detail,
        )
    )


__all__ = [
    "DEFAULT_CERT_TTL_SECONDS",
    "JSON",
    "MAX_BODY_BYTES",
    "ApiError",
    "CentralState",
    "audit",
    "error_response",
    "guarded",
    "json_body",
    "media_type",
    "parse_count",
    "read_body",
    "struct_response",
]

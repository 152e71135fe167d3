"""Stage 2 of validation: what types cannot say. Each check returns every violation,
each naming the field by path (``rule[1].split[0].weight``), so ``meshagent apply``
and ``meshagent policy validate`` can print all of them at once."""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshagent.policy.model import (
    Resource,
    Retry,
    RouteMatch,
    SplitTarget,
    Sticky,
    Timeout,
    TrafficPermission,
    TrafficRoute,
    ValueMatch,
)

_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
_STATUS_RANGE = range(100, 600)
# Finest split: a weight may be as small as 1/10000 of the total.
WEIGHT_RESOLUTION = 10_000


@dataclass(frozen=True, slots=True)
class Violation:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def _is_name(text: str) -> bool:
    return _NAME.fullmatch(text) is not None


def _names(resource: Resource, out: list[Violation]) -> None:
    for field in ("name", "mesh", "destination"):
        value = getattr(resource, field)
        if not _is_name(value):
            out.append(
                Violation(
                    field,
                    f"{value!r} is not a valid name (lowercase letters, "
                    "digits and '-', at most 63)",
                )
            )


def _regex(path: str, pattern: str, out: list[Violation]) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        out.append(Violation(path, f"invalid regex {pattern!r}: {exc}"))


def _value_match(path: str, value: str | ValueMatch, out: list[Violation]) -> None:
    if isinstance(value, str):
        return
    given = [k for k in ("exact", "regex", "present") if getattr(value, k) is not None]
    if len(given) != 1:
        out.append(Violation(path, "give exactly one of exact, regex, present"))
    elif value.regex is not None:
        _regex(f"{path}.regex", value.regex, out)
    elif value.present is False:
        out.append(Violation(f"{path}.present", "only present = true is supported"))


def _match(path: str, match: RouteMatch, out: list[Violation]) -> None:
    paths = [k for k in ("path", "path_prefix", "path_regex") if getattr(match, k) is not None]
    if len(paths) > 1:
        out.append(
            Violation(
                path, f"give at most one of path, path_prefix, path_regex (got {', '.join(paths)})"
            )
        )
    for key in ("path", "path_prefix"):
        value = getattr(match, key)
        if value is not None and not value.startswith("/"):
            out.append(Violation(f"{path}.{key}", f"{value!r} must start with /"))
    if match.path_regex is not None:
        _regex(f"{path}.path_regex", match.path_regex, out)
    for n, method in enumerate(match.method):
        if method not in _METHODS:
            out.append(
                Violation(
                    f"{path}.method[{n}]", f"{method!r} is not an HTTP method (use upper case)"
                )
            )
    for name, value in match.headers.items():
        if not _HEADER.fullmatch(name):
            out.append(Violation(f"{path}.headers", f"{name!r} is not a header name"))
        _value_match(f"{path}.headers.{name}", value, out)
    for name, value in match.query.items():
        _value_match(f"{path}.query.{name}", value, out)


def _split(path: str, split: list[SplitTarget], out: list[Violation]) -> None:
    if not split:
        out.append(Violation(path, "needs at least one target"))
        return
    total = sum(t.weight for t in split)
    for n, target in enumerate(split):
        if not _is_name(target.service):
            out.append(Violation(f"{path}[{n}].service", f"{target.service!r} is not a valid name"))
        if target.weight < 0:
            out.append(Violation(f"{path}[{n}].weight", "must not be negative"))
        elif total > 0 and 0 < target.weight / total < 1 / WEIGHT_RESOLUTION:
            out.append(
                Violation(f"{path}[{n}].weight", f"below 1/{WEIGHT_RESOLUTION} of the total")
            )
    if total <= 0:
        out.append(Violation(path, "weights must add up to more than 0"))
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for n, target in enumerate(split):
        key = (target.service, tuple(sorted(target.tags.items())))
        if key in seen:
            out.append(Violation(f"{path}[{n}]", "the same service and tags appear twice"))
        seen.add(key)


def _sticky(path: str, sticky: Sticky | None, out: list[Violation]) -> None:
    if sticky is None:
        return
    given = [k for k in ("cookie", "header") if getattr(sticky, k)]
    if len(given) != 1:
        out.append(Violation(path, "give exactly one of cookie, header"))


def _route(route: TrafficRoute, out: list[Violation]) -> None:
    if route.source != "*" and not _is_name(route.source):
        out.append(Violation("source", f'{route.source!r} is not a service name or "*"'))
    if not route.rule and route.default is None:
        out.append(Violation("", "a TrafficRoute needs at least one rule or a default"))
    for n, rule in enumerate(route.rule):
        where = f"rule[{n}]"
        _match(f"{where}.match", rule.match, out)
        _split(f"{where}.split", rule.split, out)
        _sticky(f"{where}.sticky", rule.sticky, out)
        if rule.rewrite is not None:
            if rule.match.path_prefix is None:
                out.append(
                    Violation(f"{where}.rewrite", "path_prefix rewrite needs match.path_prefix")
                )
            if not rule.rewrite.path_prefix.startswith("/"):
                out.append(Violation(f"{where}.rewrite.path_prefix", "must start with /"))
    if route.default is not None:
        _split("default.split", route.default.split, out)
        _sticky("default.sticky", route.default.sticky, out)


def _permission(permission: TrafficPermission, out: list[Violation]) -> None:
    if not permission.sources:
        out.append(Violation("sources", 'list at least one service, or "*"'))
    for n, source in enumerate(permission.sources):
        if source != "*" and not _is_name(source):
            out.append(Violation(f"sources[{n}]", f'{source!r} is not a service name or "*"'))


def _timeout(timeout: Timeout, out: list[Violation]) -> None:
    fields = ("connect", "request", "per_try", "idle")
    if all(getattr(timeout, f) is None for f in fields):
        out.append(Violation("", "set at least one of connect, request, per_try, idle"))
    for field in fields:
        value = getattr(timeout, field)
        if value is not None and value <= 0:
            out.append(Violation(field, "must be positive"))
    if timeout.request and timeout.per_try and timeout.per_try > timeout.request:
        out.append(Violation("per_try", "is longer than request, so it could never end a try"))
    if timeout.route is not None:
        for field in ("connect", "idle"):
            if getattr(timeout, field) is not None:
                out.append(
                    Violation(
                        field,
                        "applies to every route of the destination; set it in a Timeout "
                        "without `route`",
                    )
                )


def _retry(retry: Retry, out: list[Violation]) -> None:
    if not 1 <= retry.attempts <= 10:
        out.append(Violation("attempts", "must be 1..10 (tries in all, the first included)"))
    for n, cause in enumerate(retry.on):
        if isinstance(cause, int) and cause not in _STATUS_RANGE:
            out.append(Violation(f"on[{n}]", f"{cause} is not an HTTP status"))
    if retry.backoff_base <= 0 or retry.backoff_max < retry.backoff_base:
        out.append(Violation("backoff_max", "needs 0 < backoff_base <= backoff_max"))
    if not 0 <= retry.budget_percent <= 100:
        out.append(Violation("budget_percent", "must be 0..100"))
    if retry.min_retries_per_second < 0:
        out.append(Violation("min_retries_per_second", "must not be negative"))


def validate(resource: Resource) -> list[Violation]:
    """Every meaning-level problem of one resource. Pure."""
    out: list[Violation] = []
    _names(resource, out)
    if isinstance(resource, TrafficRoute):
        _route(resource, out)
    elif isinstance(resource, TrafficPermission):
        _permission(resource, out)
    elif isinstance(resource, Timeout):
        _timeout(resource, out)
    else:
        _retry(resource, out)
    return out

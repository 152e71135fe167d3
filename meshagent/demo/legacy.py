"""The migration demo's apps, run as real processes: ``python -m meshagent.demo.legacy``.

    monolith              the legacy process: /users, /orders, /healthz, state in memory
    orders --version v1   the new orders service, peeled off the monolith
    orders --version v2   its next version: answers carry an ``eta_days`` (visible change)

Every answer is JSON with ``app`` and ``version``, so a client (and the demo) can tell
who served it. Plain HTTP on 127.0.0.1: the local agent is the only caller.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from dataclasses import dataclass, field

import trio

from meshagent.demo.apps import serve_http_app

_ITEM = re.compile(r"^/(users|orders)/(\d+)$")


@dataclass
class Monolith:
    """A legacy app with state: users and orders in memory, created on first sight."""

    orders: dict[int, dict[str, object]] = field(default_factory=dict)
    users: dict[int, dict[str, object]] = field(default_factory=dict)

    def respond(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, object]]:
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, {"version": "legacy", "status": "ok"}
        if path == "/orders" and method == "POST":
            return self._create_order(body)
        if path in ("/users", "/orders") and method in ("GET", "HEAD"):
            table = self.users if path == "/users" else self.orders
            return 200, {"version": "legacy", path[1:]: sorted(table)}
        match = _ITEM.match(path)
        if match is None or method not in ("GET", "HEAD"):
            return 404, {"version": "legacy", "error": f"no route for {method} {path}"}
        kind, number = match.group(1), int(match.group(2))
        if kind == "users":
            user = self.users.setdefault(number, {"id": number, "name": f"user-{number}"})
            return 200, {"version": "legacy", "user": user}
        order = self.orders.setdefault(number, {"id": number, "items": number % 5 + 1})
        return 200, {"version": "legacy", "order": order}

    def _create_order(self, body: bytes) -> tuple[int, dict[str, object]]:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return 400, {"version": "legacy", "error": "the body is not JSON"}
        number = max(self.orders, default=0) + 1
        items = data.get("items", 1) if isinstance(data, dict) else 1
        order: dict[str, object] = {"id": number, "items": items if isinstance(items, int) else 1}
        self.orders[number] = order
        return 201, {"version": "legacy", "order": order}


@dataclass
class OrdersService:
    """The new orders service. v2 adds a delivery estimate: the visible difference."""

    version: str

    def respond(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, object]]:
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, {"version": self.version, "status": "ok"}
        match = _ITEM.match(path)
        if match is None or match.group(1) != "orders" or method not in ("GET", "HEAD"):
            return 404, {"version": self.version, "error": f"no route for {method} {path}"}
        number = int(match.group(2))
        order: dict[str, object] = {"id": number, "items": number % 5 + 1}
        if self.version == "v2":
            order["eta_days"] = number % 3 + 1
        return 200, {"version": self.version, "order": order}


async def main(app: str, version: str, host: str, port: int) -> None:
    if app == "monolith":
        await serve_http_app("monolith", host=host, port=port, respond=Monolith().respond)
    else:
        service = OrdersService(version)
        await serve_http_app("orders", host=host, port=port, respond=service.respond)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", choices=["monolith", "orders"])
    parser.add_argument("--version", default="v1", choices=["v1", "v2"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, args.app, args.version, args.host, args.port)

"""The migration demo's traffic generator: ``python -m meshagent.demo.traffic --port N``.

Keep-alive HTTP clients send ``GET /orders/<n>`` and ``GET /users/<n>`` in turn to the
front door (an agent's outbound) and count who answered (the JSON's ``app`` and
``version``), per path, with the success rate; a line per second shows the split.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import trio

WORKERS = 8
REQUEST_TIMEOUT_SECONDS = 5.0
PATHS = ("orders", "users")
Say = Callable[[str], None]


@dataclass
class Tally:
    """Answers by path ("orders", "users") and by who served them ("orders v2")."""

    ok: int = 0
    failed: int = 0
    served: dict[str, Counter[str]] = field(
        default_factory=lambda: {path: Counter() for path in PATHS}
    )
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def success_rate(self) -> float:
        return 100.0 * self.ok / self.total if self.total else 0.0

    def share(self, path: str, server: str) -> float:
        """The fraction of successful ``path`` answers that ``server`` gave."""
        counts = self.served[path]
        return counts[server] / max(sum(counts.values()), 1)

    def servers(self, path: str) -> set[str]:
        return set(self.served[path])

    def line(self, seconds: float) -> str:
        parts = [f"{self.total / max(seconds, 1e-9):6.0f} req/s", f"ok {self.success_rate():5.1f}%"]
        for path in PATHS:
            counts = self.served[path]
            split = " · ".join(
                f"{server} {100 * self.share(path, server):5.1f}%" for server in sorted(counts)
            )
            parts.append(f"/{path}: {split or '-'}")
        if self.errors:
            parts.append("errors: " + ", ".join(f"{e} x{n}" for e, n in self.errors.most_common(3)))
        return "  " + "   ".join(parts)


async def _one(client: httpx.AsyncClient, path: str, number: int, tally: Tally) -> None:
    try:
        with trio.fail_after(REQUEST_TIMEOUT_SECONDS):
            response = await client.get(f"/{path}/{number}")
        answer = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, trio.TooSlowError) as exc:
        tally.failed += 1
        tally.errors[type(exc).__name__] += 1
        return
    if not isinstance(answer, dict):
        tally.failed += 1
        tally.errors[f"HTTP {response.status_code}"] += 1
        return
    tally.ok += 1
    tally.served[path][f"{answer.get('app')} {answer.get('version')}"] += 1


async def drive(port: int, seconds: float, say: Say | None = None) -> Tally:
    """``WORKERS`` keep-alive clients for ``seconds``; a line per second to ``say``."""
    tally = Tally()
    start = trio.current_time()
    end = start + seconds
    numbers = itertools.count(1)

    async def worker(client: httpx.AsyncClient) -> None:
        for n in numbers:
            if trio.current_time() >= end:
                return
            await _one(client, PATHS[n % 2], n, tally)

    async def report() -> None:
        while True:
            await trio.sleep(1)
            if say is not None:
                say(tally.line(trio.current_time() - start))

    limits = httpx.Limits(max_connections=WORKERS, max_keepalive_connections=WORKERS)
    async with (
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, trust_env=False, timeout=None
        ) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(report)
        async with trio.open_nursery() as workers:
            for _ in range(WORKERS):
                workers.start_soon(worker, client)
        nursery.cancel_scope.cancel()
    if say is not None:
        say(tally.line(trio.current_time() - start) + "   (step total)")
    return tally


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the front door's port")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(drive, args.port, args.seconds, print)

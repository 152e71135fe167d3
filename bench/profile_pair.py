"""Where the meshagent pair's CPU goes under compare.py's keep-alive load: py-spy on
both agents, summed by function area. Run through compare.py:

    python bench/compare.py --profile http [--profile-seconds 20] [--keep]
    python bench/compare.py --profile l4 [--profile-load new-conn]

It starts the upstream and one meshagent pair as ``compare.py`` does, runs wrk (or
bench/loadgen.py) with 32 keep-alive connections, waits 2 s, then samples both agents
with ``py-spy record --format raw --nonblocking`` (100 samples/s, idle samples left
out) for ``--profile-seconds``. It prints, per agent, the share of busy samples by
area (the innermost frame that belongs to a known area decides) and the functions
that were innermost most often. With ``--keep`` the raw stacks stay in the temp dir
(collapsed-stack format: feed them to any flame graph tool).

py-spy comes from PyPI (``.venv/bin/pip install py-spy``); it needs ptrace rights
over the agents (root, or the agents being this user's children with
kernel.yama.ptrace_scope <= 1).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import raise_open_files_limit, stop_all, work_in, write_identities
from peers import Stopper, find_tools, start_meshagent_pair, start_upstream

HERE = Path(__file__).resolve().parent

# Work that is not per request under a keep-alive load: a sample whose stack holds
# such a frame anywhere goes to that area.
STACK_AREAS: list[tuple[str, re.Pattern[str]]] = [
    ("new connections: connect + TLS handshake (pool misses)",
     re.compile(r"do_handshake|\._connect \(meshagent/dataplane/|connect_endpoint \(")),
    ("closing connections", re.compile(r"_real_close|aclose_forcefully|\.aclose \(")),
]
# (area, pattern on "function (file:line)"); otherwise the first area, walking from the
# innermost frame outwards, that matches a frame takes the sample.
AREAS: list[tuple[str, re.Pattern[str]]] = [
    ("TLS: ssl module (encrypt/decrypt, SSLObject calls)", re.compile(r"\(ssl\.py:")),
    ("TLS: trio.SSLStream (MemoryBIO shuffling, retries)", re.compile(r"trio/_ssl\.py:")),
    ("TLS: dataplane/sslsocket.py (SSLSocket driving, readiness waits)",
     re.compile(r"meshagent/dataplane/sslsocket\.py")),
    ("socket calls (send/recv through trio.socket or tcp_proxy.PlainSide)",
     re.compile(r"trio/_socket\.py:|trio/_highlevel_socket\.py:|\(socket\.py:|^PlainSide\.")),
    ("trio scheduler, epoll, cancel scopes",
     re.compile(r"trio/_core/|trio/_timeouts\.py|outcome/|sniffio/|trio/_util\.py|attrs gen")),
    ("L4 frames between agents (protocol/frames.py)", re.compile(r"meshagent/protocol/frames")),
    ("header rewriting (protocol/headers.py)", re.compile(r"meshagent/protocol/headers")),
    ("HTTP framing (protocol/http1.py, httptools)",
     re.compile(r"meshagent/protocol/|httptools")),
    ("logging", re.compile(r"logging/|meshagent/log")),
    ("routing and balancing", re.compile(r"meshagent/routing/|meshagent/snapshot/")),
    ("connection pool (dataplane/pool.py)", re.compile(r"meshagent/dataplane/pool\.py")),
    ("HTTP proxy shell (dataplane/http_*.py)", re.compile(r"meshagent/dataplane/http_")),
    ("TCP proxy shell (dataplane/tcp_proxy.py, streams)", re.compile(r"meshagent/dataplane/")),
]
OTHER = "other"


def area_of(frames: list[str]) -> str:
    for area, pattern in STACK_AREAS:
        if any(pattern.search(frame) for frame in frames):
            return area
    for frame in reversed(frames):
        for area, pattern in AREAS:
            if pattern.search(frame):
                return area
    return OTHER


def summarise(raw: Path) -> tuple[int, Counter[str], Counter[str]]:
    """Samples, samples by area, samples by innermost function."""
    areas: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames and frames[0].startswith(("process ", "thread ")):
            frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        areas[area_of(frames)] += count
        leaf = re.sub(r":\d+\)$", ")", frames[-1])
        leaves[leaf] += count
    return total, areas, leaves


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def profile(args: argparse.Namespace, connections: int, *, close: bool = False) -> int:
    """Profile under ``connections`` keep-alive connections, or with ``close`` a new
    connection per request (wrk only)."""
    spy = py_spy()
    if spy is None:
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    nofile = raise_open_files_limit()
    tmp = Path(tempfile.mkdtemp(prefix="meshbench-profile-"))
    work_in(tmp)
    stops: list[Stopper] = []
    try:
        tools = find_tools(args.install, tmp)
        upstream = start_upstream(tools, tmp, 1 << 20, nofile, stops)
        tls = write_identities(tmp)
        name = "meshagent L4" if args.profile == "l4" else "meshagent HTTP"
        path = start_meshagent_pair(
            name, None if args.profile == "l4" else "http", tls, tmp, upstream, 1000, stops
        )
        seconds = args.profile_seconds
        load_seconds = seconds + 4
        if "wrk" in tools.paths:
            load_args = [tools.paths["wrk"], "-t1", f"-c{connections}",
                         f"-d{round(load_seconds)}s", f"http://127.0.0.1:{path.port}/small",
                         *(["-H", "Connection: close"] if close else [])]
        else:
            load_args = [sys.executable, str(HERE / "loadgen.py"), "run", "--port",
                         str(path.port), "--connections", str(connections),
                         "--seconds", str(load_seconds)]
        load = subprocess.Popen(load_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stops.append(lambda: load.kill() if load.poll() is None else None)
        time.sleep(2)
        spies = {}
        for agent, pid in path.proxies.items():
            out = tmp / f"{agent}.raw.txt"
            spies[agent] = (out, subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--duration", str(round(seconds)),
                 "--rate", "100", "--format", "raw", "--output", str(out),
                 # --native must pause the process for each sample (py-spy's rule)
                 *(["--native"] if args.profile_native else ["--nonblocking"])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            ))
        kind = "a new connection per request (Connection: close)" if close else "keep-alive"
        print(f"profiling {name} ({', '.join(path.proxies)}) for {seconds:g} s under "
              f"{connections} {kind} connections, GET /small", flush=True)
        status = 0
        for agent, (out, proc) in spies.items():
            _, err = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0 or not out.exists():
                print(f"py-spy on {agent} failed: {err.decode(errors='replace')[-500:]}",
                      file=sys.stderr)
                status = 1
                continue
            total, areas, leaves = summarise(out)
            print(f"\n{agent}: {total} busy samples")
            for area, count in areas.most_common():
                print(f"  {100 * count / total:5.1f} %  {area}")
            print("  innermost functions:")
            for leaf, count in leaves.most_common(12):
                print(f"  {100 * count / total:5.1f} %  {leaf[:110]}")
        load.wait(timeout=30)
        return status
    finally:
        stop_all(stops)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

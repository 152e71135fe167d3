"""The ``meshagent`` command line. Every user error is one line on stderr and exit 1."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TextIO

import typer

from meshagent import __version__
from meshagent.cli.pki import _Command, _Group

app = typer.Typer(
    cls=_Group,
    name="meshagent",
    help="A service mesh for virtual machines and bare metal.",
    epilog="Example: meshagent demo (a whole mesh on this machine, checked step by step)",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", help="Path to agent.toml.", show_default=True),
]


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _check_config(path: Path) -> tuple[object, list[str]]:
    from meshagent.agent.main import identities_of
    from meshagent.config.agent import AgentConfig, validate_agent
    from meshagent.config.load import ConfigError, load_toml
    from meshagent.pki.files import PkiError, check_identity_files

    try:
        config = load_toml(path, AgentConfig)
    except ConfigError as exc:
        return None, [str(exc)]
    problems = [f"{path}: {p}" for p in validate_agent(config)]
    if problems:
        return config, problems
    if config.policies:
        from meshagent.policy.load import PolicyError, load_paths

        try:
            load_paths([Path(config.policies)])
        except PolicyError as exc:
            problems += exc.problems
    if config.central is not None:
        return config, _central_problems(config)
    now = datetime.now(UTC)
    for service, files in identities_of(config).items():
        try:
            check_identity_files(
                Path(files.ca), Path(files.cert), Path(files.key),
                mesh=config.mesh, service=service, now=now,
            )
        except PkiError as exc:
            problems.append(str(exc))
    return config, problems


def _central_problems(config: Any) -> list[str]:
    """What must be readable before an agent with [central] can start."""
    from meshagent.agent.central import load_joined
    from meshagent.agent.central_client import central_tls_context

    problems: list[str] = []
    try:
        central_tls_context(config.central.ca)
    except ValueError as exc:
        problems.append(str(exc))
    if load_joined(config) is None:  # not joined yet: the join token is needed
        path = Path(config.central.token_file)
        try:
            if not path.read_text().strip():
                problems.append(f"central.token_file: {path} is empty")
        except OSError as exc:
            problems.append(
                f"central.token_file: cannot read {path}: {exc.strerror or exc} (make one "
                "with: meshagent token create --mesh <mesh> --service <service>)"
            )
    return problems


@app.command(cls=_Command)
def check(config: ConfigOption = Path("/etc/meshagent/agent.toml")) -> None:
    """Validate agent.toml and the certificates it names; print every problem.

    Example: meshagent check --config /etc/meshagent/agent.toml
    """
    _, problems = _check_config(config)
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{config}: ok")


@app.command(cls=_Command)
def run(config: ConfigOption = Path("/etc/meshagent/agent.toml")) -> None:
    """Run the agent: proxy the host's inbounds and outbounds over mTLS.

    Stops cleanly on SIGTERM or Ctrl-C: deregisters from Consul, stops accepting,
    and lets open connections finish within limits.drain_timeout.

    Example: meshagent run --config /etc/meshagent/agent.toml
    """
    import trio

    from meshagent import log
    from meshagent.agent.central import JoinError
    from meshagent.agent.main import run_agent
    from meshagent.config.agent import AgentConfig
    from meshagent.config.load import ConfigError
    from meshagent.dataplane.errors import BindError

    loaded, problems = _check_config(config)
    if problems:
        more = f" (and {len(problems) - 1} more: meshagent check)" if len(problems) > 1 else ""
        fail(problems[0] + more)
    assert isinstance(loaded, AgentConfig)
    routes: dict[str, TextIO | None] = {}
    if loaded.log.access == "off":
        routes["access"] = None
    elif loaded.log.access != "stderr":
        try:
            routes["access"] = log.open_log_file(loaded.log.access)
        except OSError as exc:
            fail(f"log.access: cannot open {loaded.log.access}: {exc.strerror or exc}")
    log.configure(
        level=loaded.log.level, fmt=loaded.log.format, routes=routes,
        mesh=loaded.mesh, node=loaded.node,
    )
    try:
        trio.run(run_agent, loaded)
    except* (ConfigError, BindError, JoinError) as group:
        fail(str(_first_leaf(group)))


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@app.command(cls=_Command)
def demo(
    duration: Annotated[
        float, typer.Option(help="Seconds of traffic in all (five steps share them).")
    ] = 20.0,
    keep_running: Annotated[
        bool, typer.Option(help="Leave the mesh up afterwards (Ctrl-C stops it).")
    ] = False,
    consul: Annotated[
        bool,
        typer.Option(
            help="Use Consul when it is installed (--no-consul: the central agent's catalog)."
        ),
    ] = True,
) -> None:
    """Strangle a legacy monolith on this machine, step by step, and check each step.

    A central agent, three agents on 127.0.0.2-4 (the monolith with its front door, the
    new orders service v1 and v2), a dev-mode Consul when installed. Traffic flows
    while /orders is peeled off the monolith, a v2 canary goes 10 -> 50 -> 100 %, and
    the mesh goes from permissive to strict mTLS. Exit code 0 only if every step met
    what it printed. Nothing is left running afterwards.

    Example: meshagent demo --duration 60 --keep-running
    """
    from meshagent.demo.mesh import run_demo

    code = run_demo(
        duration=duration,
        keep_running=keep_running,
        use_consul=consul,
        say=lambda line: typer.echo(line),
    )
    raise typer.Exit(code)


@app.command(cls=_Command)
def version() -> None:
    """Print the meshagent version.

    Example: meshagent version
    """
    typer.echo(__version__)


policy_app = typer.Typer(
    cls=_Group,
    help="Check policy documents.",
    epilog="Example: meshagent policy validate examples/policies/",
    no_args_is_help=True,
    add_completion=False,
)


@policy_app.command("validate", cls=_Command)
def policy_validate(
    paths: Annotated[list[Path], typer.Argument(help="Policy files or directories.")],
) -> None:
    """Check TOML/JSON policy documents; print every problem, one line each.

    Example: meshagent policy validate /etc/meshagent/policies/
    """
    from meshagent.policy.load import PolicyError, load_paths

    try:
        resources = load_paths(paths)
    except PolicyError as exc:
        for problem in exc.problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{len(resources)} resources ok")


def _add_subcommands() -> None:
    from meshagent.cli.central import register as register_central
    from meshagent.cli.host import register as register_host
    from meshagent.cli.pki import pki_app

    app.add_typer(pki_app, name="pki")
    app.add_typer(policy_app, name="policy")
    register_central(app)
    register_host(app)


_add_subcommands()


def main() -> None:
    sys.exit(app())

"""``meshagent central`` and the operator commands that talk to it.

    meshagent central --config central.toml        run the central agent
    meshagent mesh create|set|set-mtls             meshes
    meshagent token create                         join tokens, mesh-scoped admin tokens
    meshagent apply -f FILE                        policies (TOML or JSON)
    meshagent get meshes|policies|dataplanes       tables, or -o json
    meshagent delete policy|mesh|dataplane         remove things

Where the central agent is, in order: ``--central URL`` / ``--central-ca FILE`` /
``--token-file FILE``; then ``$MESHAGENT_CENTRAL``, ``$MESHAGENT_CENTRAL_CA``,
``$MESHAGENT_TOKEN_FILE``; then ``~/.config/meshagent/cli.toml`` (keys ``central``,
``central_ca``, ``token_file``). Every user error is one line on stderr and exit 1;
an invalid policy document prints every problem, one line each.
"""

from __future__ import annotations

import json
import os
import ssl
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

from meshagent.cli.pki import _Command, _Group
from meshagent.pki.secrets import SecretError, token_id_of

CLI_CONFIG = Path("~/.config/meshagent/cli.toml")
DEFAULT_CENTRAL = "https://127.0.0.1:5681"
TIMEOUT_SECONDS = 30.0
MAX_TABLE_WIDTH = 1000


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _fail_all(problems: list[str]) -> NoReturn:
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    raise typer.Exit(1)


# ---------------------------------------------------------------------------- the process


def central(
    config: Annotated[
        Path, typer.Option("--config", "-c", metavar="PATH", help="Path to central.toml.")
    ] = Path("/etc/meshagent/central.toml"),
) -> None:
    """Run the central agent: meshes, their CAs, policies, tokens, over an HTTPS API.

    At first start it creates data_dir, its TLS CA (central-ca.pem: give it to
    operators) and a global admin token (admin.token), and says where they are.
    Stops cleanly on SIGTERM or Ctrl-C.
    """
    import trio

    from meshagent import log
    from meshagent.central.main import run_central
    from meshagent.central.store import StoreUnavailable
    from meshagent.central.tls import CentralTlsError
    from meshagent.config.central import load_central
    from meshagent.config.load import ConfigError
    from meshagent.pki.files import PkiError
    from meshagent.pki.secrets import SecretError

    try:
        loaded = load_central(config)
    except ConfigError as exc:
        _fail(str(exc))
    log.configure(level=loaded.log.level, fmt=loaded.log.format)
    try:
        trio.run(lambda: run_central(loaded, say=lambda line: typer.echo(line)))
    except* (ConfigError, StoreUnavailable, PkiError, SecretError, CentralTlsError) as group:
        _fail(str(_first_leaf(group)))
    except* OSError as group:
        error = _first_leaf(group)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        _fail(f"cannot serve on {loaded.listen}: {reason}")


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


# ---------------------------------------------------------------------------- the client


@dataclass(frozen=True, slots=True)
class Target:
    """Where the central agent is and how to prove who we are."""

    url: str
    ca: Path | None
    token_file: Path


def _cli_file() -> dict[str, Any]:
    path = CLI_CONFIG.expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        _fail(f"{path}: cannot read it: {exc}")
    unknown = set(data) - {"central", "central_ca", "token_file"}
    if unknown:
        _fail(f"{path}: unknown key {sorted(unknown)[0]!r} (keys: central, central_ca, token_file)")
    if not all(isinstance(v, str) for v in data.values()):
        _fail(f"{path}: central, central_ca and token_file must be strings")
    return data


def resolve_target(central: str | None, central_ca: Path | None, token_file: Path | None) -> Target:
    """Flags, then environment, then ~/.config/meshagent/cli.toml."""
    file = _cli_file() if None in (central, central_ca, token_file) else {}
    url = central or os.environ.get("MESHAGENT_CENTRAL") or file.get("central") or DEFAULT_CENTRAL
    if "://" not in url:
        url = f"https://{url}"
    ca_text = os.environ.get("MESHAGENT_CENTRAL_CA") or file.get("central_ca")
    ca = central_ca or (Path(ca_text).expanduser() if ca_text else None)
    token_text = os.environ.get("MESHAGENT_TOKEN_FILE") or file.get("token_file")
    token = token_file or (Path(token_text).expanduser() if token_text else None)
    if token is None:
        _fail(
            "no admin token: pass --token-file FILE, set MESHAGENT_TOKEN_FILE, or put "
            f"token_file in {CLI_CONFIG}"
        )
    return Target(url.rstrip("/"), ca, token)


class CentralClient:
    """A blocking client of the central agent's API; every failure is ``_fail``."""

    def __init__(self, target: Target) -> None:
        try:
            token = target.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            _fail(f"--token-file {target.token_file}: {reason}")
        try:
            token_id_of(token)
        except SecretError as exc:  # never echo the file: it may hold another secret
            _fail(f"--token-file {target.token_file}: {exc}")
        verify: ssl.SSLContext | bool = True
        if target.ca is not None:
            try:
                verify = ssl.create_default_context(cafile=str(target.ca))
            except (OSError, ssl.SSLError) as exc:
                _fail(f"--central-ca {target.ca}: not a readable PEM certificate ({exc})")
        self.target = target
        self._http = httpx.Client(
            base_url=target.url,
            verify=verify,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "meshagent-cli"},
            timeout=TIMEOUT_SECONDS,
            trust_env=False,
        )

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; return the JSON answer, or fail with the server's error."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            text = str(exc)
            if "CERTIFICATE_VERIFY_FAILED" in text or "certificate" in text.lower():
                _fail(
                    f"{self.target.url}: TLS certificate not trusted ({text}); pass the "
                    "central agent's central-ca.pem with --central-ca"
                )
            _fail(f"cannot reach the central agent at {self.target.url}: {text or 'refused'}")
        except httpx.TimeoutException:
            _fail(
                f"the central agent at {self.target.url} did not answer within "
                f"{TIMEOUT_SECONDS:g} s"
            )
        except httpx.HTTPError as exc:
            _fail(f"{self.target.url}: {exc}")
        try:
            answer = response.json()
        except ValueError:
            _fail(f"{self.target.url}{path}: HTTP {response.status_code}, not a JSON answer")
        if response.is_success:
            return answer
        error = answer.get("error") if isinstance(answer, dict) else None
        problems = answer.get("problems") if isinstance(answer, dict) else None
        if isinstance(problems, list) and problems:
            _fail_all([str(p) for p in problems])
        _fail(str(error or f"HTTP {response.status_code}"))


CentralOption = Annotated[
    str | None,
    typer.Option("--central", metavar="URL", help="Central agent URL (env MESHAGENT_CENTRAL)."),
]
CaOption = Annotated[
    Path | None,
    typer.Option(
        "--central-ca", metavar="FILE", help="Its central-ca.pem (env MESHAGENT_CENTRAL_CA)."
    ),
]
TokenOption = Annotated[
    Path | None,
    typer.Option(
        "--token-file", metavar="FILE", help="Admin token file (env MESHAGENT_TOKEN_FILE)."
    ),
]
OutputOption = Annotated[
    str, typer.Option("--output", "-o", metavar="FORMAT", help="table or json.")
]


@contextmanager
def _client(
    central_url: str | None, central_ca: Path | None, token_file: Path | None
) -> Iterator[CentralClient]:
    client = CentralClient(resolve_target(central_url, central_ca, token_file))
    try:
        yield client
    finally:
        client.close()


def _read_file(option: str, path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        _fail(f"{option} {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        _fail(f"{option} {path}: not UTF-8 text")


def _check_output(output: str) -> None:
    if output not in ("table", "json"):
        _fail(f'--output: "{output}" is not one of: table, json')


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def _print_table(columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, box=None, header_style="bold", pad_edge=False)
    for row in rows:
        table.add_row(*row)
    console = Console(soft_wrap=True)
    if not console.is_terminal:  # a pipe or a file: never cut a cell to fit 80 columns
        console = Console(soft_wrap=True, width=MAX_TABLE_WIDTH)
    console.print(table)


# ---------------------------------------------------------------------------- meshes


mesh_app = typer.Typer(
    cls=_Group,
    help="Create meshes and change their mTLS mode and default permission.",
    epilog="Example: meshagent mesh create shop --mtls permissive",
    no_args_is_help=True,
    add_completion=False,
)


@mesh_app.command(
    "create",
    cls=_Command,
    epilog=(
        "Example: meshagent mesh create shop --mtls permissive\n\n"
        "Example: meshagent mesh create bank --default-deny --ca provided --ca-cert ca.pem "
        "--ca-key ca-key.pem"
    ),
)
def mesh_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Mesh (tenant) name.")],
    mtls: Annotated[
        str, typer.Option(metavar="MODE", help="strict, permissive or off.")
    ] = "strict",
    default_deny: Annotated[
        bool,
        typer.Option(
            "--default-deny",
            help="Strict: a service no TrafficPermission names takes no callers.",
        ),
    ] = False,
    ca: Annotated[str, typer.Option(metavar="KIND", help="builtin or provided.")] = "builtin",
    ca_cert: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Provided CA certificate (PEM).")
    ] = None,
    ca_key: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Provided CA private key (PEM).")
    ] = None,
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """Create a mesh with its own CA (made by the central agent, or yours)."""
    if ca not in ("builtin", "provided"):
        _fail(f'--ca: "{ca}" is not one of: builtin, provided')
    if ca == "provided" and (ca_cert is None or ca_key is None):
        _fail("--ca provided needs --ca-cert FILE and --ca-key FILE")
    if ca == "builtin" and (ca_cert is not None or ca_key is not None):
        _fail("--ca-cert and --ca-key go with --ca provided")
    body: dict[str, Any] = {"name": name, "mtls": mtls, "default_allow": not default_deny, "ca": ca}
    if ca_cert is not None and ca_key is not None:
        body["ca_cert"] = _read_file("--ca-cert", ca_cert)
        body["ca_key"] = _read_file("--ca-key", ca_key)
    with _client(central_url, central_ca, token_file) as client:
        mesh = client.call("POST", "/v1/meshes", json=body)
    typer.echo(
        f"created mesh {mesh['name']} (mtls {mesh['mtls']}, {_default(mesh)}, {mesh['ca']} CA)"
    )


def _default(mesh: dict[str, Any]) -> str:
    return "default allow" if mesh.get("default_allow", True) else "default deny"


@mesh_app.command(
    "set",
    cls=_Command,
    epilog=(
        "Example: meshagent mesh set shop --default-deny\n\n"
        "Example: meshagent mesh set shop --mtls strict --default-deny"
    ),
)
def mesh_set(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Mesh name.")],
    mtls: Annotated[
        str | None, typer.Option(metavar="MODE", help="strict, permissive or off.")
    ] = None,
    default_allow: Annotated[
        bool | None,
        typer.Option(
            "--default-allow/--default-deny",
            help="May a service no TrafficPermission names take every caller of the mesh?",
            show_default=False,
        ),
    ] = None,
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """Change a mesh's mTLS mode and/or default permission (strict meshes: --default-deny)."""
    body: dict[str, Any] = {}
    if mtls is not None:
        body["mtls"] = mtls
    if default_allow is not None:
        body["default_allow"] = default_allow
    if not body:
        _fail("nothing to change: pass --mtls MODE, --default-allow or --default-deny")
    with _client(central_url, central_ca, token_file) as client:
        mesh = client.call("PATCH", f"/v1/meshes/{name}", json=body)
    typer.echo(f"mesh {mesh['name']}: mtls {mesh['mtls']}, {_default(mesh)}")


@mesh_app.command(
    "set-mtls", cls=_Command, epilog="Example: meshagent mesh set-mtls shop permissive"
)
def mesh_set_mtls(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Mesh name.")],
    mode: Annotated[str, typer.Argument(metavar="MODE", help="strict, permissive or off.")],
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """Change a mesh's mTLS mode (permissive is the migration step)."""
    with _client(central_url, central_ca, token_file) as client:
        mesh = client.call("PATCH", f"/v1/meshes/{name}", json={"mtls": mode})
    typer.echo(f"mesh {mesh['name']}: mtls {mesh['mtls']}")


@mesh_app.command(
    "rotate-ca",
    cls=_Command,
    epilog=(
        "Example: meshagent mesh rotate-ca shop\n\n"
        "Example: meshagent mesh rotate-ca shop --ca provided --ca-cert new.pem "
        "--ca-key new-key.pem\n\n"
        "Example: meshagent mesh rotate-ca shop --finish"
    ),
)
def mesh_rotate_ca(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Mesh name.")],
    ca: Annotated[str, typer.Option(metavar="KIND", help="builtin or provided.")] = "builtin",
    ca_cert: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Provided new CA certificate (PEM).")
    ] = None,
    ca_key: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Provided new CA private key (PEM).")
    ] = None,
    finish: Annotated[
        bool,
        typer.Option(
            "--finish",
            help="Drop the previous CA once every dataplane uses the new one (refused "
            "while the new CA is being distributed).",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="With --finish: even while online dataplanes still use the previous CA.",
        ),
    ] = False,
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """Replace a mesh's CA without downtime.

    Starting puts the new CA in every dataplane's trust bundle while the previous CA
    keeps signing (phase "distributing"). Once every online dataplane has applied the
    new bundle (or after central.toml's ca_rotation_switch_timeout, 10 min by
    default, with a warning), the central agent makes the new CA sign by itself (phase
    "renewing") and agents renew within ca_rotation_spread. When `meshagent get
    dataplanes` shows every dataplane on the current CA, --finish drops the previous
    CA from the trust bundle and deletes its key (refused while distributing).
    """
    if force and not finish:
        _fail("--force goes with --finish")
    if finish:
        if ca != "builtin" or ca_cert is not None or ca_key is not None:
            _fail("--finish takes no --ca, --ca-cert or --ca-key")
        with _client(central_url, central_ca, token_file) as client:
            done = client.call(
                "POST", f"/v1/meshes/{name}/ca-rotation/finish", json={"force": force}
            )
        left = done.get("left_behind") or []
        typer.echo(
            f"mesh {name}: CA rotation finished; the previous CA is no longer trusted "
            f"(CA {str(done['ca_fingerprint'])[:12]})"
        )
        if left:
            typer.echo(
                f"warning: still on the previous CA, cut off until they renew: {', '.join(left)}",
                err=True,
            )
        return
    if ca not in ("builtin", "provided"):
        _fail(f'--ca: "{ca}" is not one of: builtin, provided')
    if ca == "provided" and (ca_cert is None or ca_key is None):
        _fail("--ca provided needs --ca-cert FILE and --ca-key FILE")
    if ca == "builtin" and (ca_cert is not None or ca_key is not None):
        _fail("--ca-cert and --ca-key go with --ca provided")
    body: dict[str, Any] = {"ca": ca}
    if ca_cert is not None and ca_key is not None:
        body["ca_cert"] = _read_file("--ca-cert", ca_cert)
        body["ca_key"] = _read_file("--ca-key", ca_key)
    with _client(central_url, central_ca, token_file) as client:
        started = client.call("POST", f"/v1/meshes/{name}/ca-rotation", json=body)
    typer.echo(
        f"mesh {name}: CA rotation started: distributing new {ca} CA "
        f"{str(started['ca_fingerprint'])[:12]}; previous "
        f"{str(started['previous_ca_fingerprint'])[:12]} signs until every online dataplane "
        f"has the new bundle; follow with: meshagent get dataplanes --mesh {name}; then: "
        f"meshagent mesh rotate-ca {name} --finish"
    )


# ---------------------------------------------------------------------------- tokens


token_app = typer.Typer(
    cls=_Group,
    help="Create join tokens and mesh-scoped admin tokens.",
    epilog="Example: meshagent token create --mesh shop --service orders > join.token",
    no_args_is_help=True,
    add_completion=False,
)


@token_app.command(
    "create",
    cls=_Command,
    epilog=(
        "Example: meshagent token create --mesh shop --service orders --ttl 30m > join.token"
        "\n\nExample: meshagent token create --admin --mesh shop > shop-admin.token"
    ),
)
def token_create(
    mesh: Annotated[
        list[str], typer.Option(metavar="NAME", help="The mesh (repeat with --admin).")
    ],
    service: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="A service the joining agent may be (repeatable)."),
    ] = None,
    admin: Annotated[
        bool, typer.Option("--admin", help="A mesh-scoped admin token instead of a join token.")
    ] = False,
    ttl: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help='Lifetime, e.g. "1h" (join default: 1h).'),
    ] = None,
    uses: Annotated[int, typer.Option(help="How many agents may join with it.")] = 1,
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """Create a token and print only the token (it is shown once, never stored)."""
    body: dict[str, Any]
    if admin:
        if service:
            _fail("--service goes with join tokens, not --admin")
        path, body = "/v1/tokens/admin", {"meshes": mesh}
    else:
        if len(mesh) != 1:
            _fail("a join token belongs to exactly one --mesh")
        if not service:
            _fail("a join token needs at least one --service")
        path, body = f"/v1/meshes/{mesh[0]}/tokens", {"services": service, "uses": uses}
    if ttl is not None:
        body["ttl"] = ttl
    with _client(central_url, central_ca, token_file) as client:
        answer = client.call("POST", path, json=body)
    typer.echo(answer["token"])


# ---------------------------------------------------------------------------- apply


def _parse_document(path: Path, text: str) -> dict[str, Any]:
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        _fail(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}")
    if not isinstance(data, dict):
        _fail(f"{path}: expected a table of kinds, e.g. [[TrafficRoute]]")
    return data


def group_by_mesh(
    document: dict[str, Any], mesh: str | None, source: str
) -> tuple[dict[str, dict[str, list[Any]]], list[str]]:
    """Split a document into one document per mesh; with ``mesh``, fill in a missing
    ``mesh`` field and refuse resources of other meshes."""
    groups: dict[str, dict[str, list[Any]]] = {}
    problems: list[str] = []
    for kind, items in document.items():
        listed = [items] if isinstance(items, dict) else items
        if not isinstance(listed, list):
            continue  # load_document reports it
        for item in listed:
            if not isinstance(item, dict):
                continue
            if mesh is not None:
                item.setdefault("mesh", mesh)
                if item["mesh"] != mesh:
                    problems.append(
                        f'{source}: {kind} "{item.get("name")}": mesh: is {item["mesh"]!r}, '
                        f"not --mesh {mesh}"
                    )
                    continue
            target = item.get("mesh")
            if isinstance(target, str):
                groups.setdefault(target, {}).setdefault(kind, []).append(item)
    return groups, problems


def apply(
    file: Annotated[
        Path, typer.Option("--file", "-f", metavar="FILE", help="A TOML or JSON policy document.")
    ],
    mesh: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Only this mesh; fills in a missing mesh field."),
    ] = None,
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """Apply policies: checked here first, then sent per mesh, all or nothing per mesh.

    Prints what was created, updated or left unchanged; on problems prints every one.

    Example: meshagent apply -f examples/policies/shop.toml
    """
    from meshagent.policy.load import PolicyError, load_document

    text = _read_file("-f", file)
    document = _parse_document(file, text)
    groups, problems = group_by_mesh(document, mesh, str(file))
    # The same checks as the central agent's, on the document as it will be sent (JSON,
    # with --mesh filled in), so every problem names this file.
    source = f"{file}.json"
    try:
        load_document(json.dumps(document).encode(), source=source)
    except PolicyError as exc:
        problems += [f"{file}{p.removeprefix(source)}" for p in exc.problems]
    if problems:
        _fail_all(problems)
    if not groups:
        _fail(f"{file}: no resources to apply")
    with _client(central_url, central_ca, token_file) as client:
        for name, doc in sorted(groups.items()):
            answer = client.call(
                "PUT",
                f"/v1/meshes/{name}/policies",
                content=json.dumps(doc).encode(),
                headers={"Content-Type": "application/json"},
            )
            for verb in ("created", "updated", "unchanged"):
                for label in answer[verb]:
                    typer.echo(f"{name}: {label} {verb}")


# ---------------------------------------------------------------------------- get and delete


get_app = typer.Typer(
    cls=_Group,
    help="Show meshes, policies and dataplanes.",
    epilog="Example: meshagent get dataplanes --mesh shop",
    no_args_is_help=True,
    add_completion=False,
)


@get_app.command("meshes", cls=_Command, epilog="Example: meshagent get meshes -o json")
def get_meshes(
    output: OutputOption = "table",
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """List the meshes this token may see."""
    _check_output(output)
    with _client(central_url, central_ca, token_file) as client:
        meshes = client.call("GET", "/v1/meshes")["meshes"]
    if output == "json":
        _print_json(meshes)
        return
    _print_table(
        ["NAME", "MTLS", "DEFAULT", "CA", "VERSION"],
        [
            [
                m["name"],
                m["mtls"],
                "allow" if m.get("default_allow", True) else "deny",
                m["ca"],
                str(m["version"]),
            ]
            for m in meshes
        ],
    )


@get_app.command(
    "policies", cls=_Command, epilog="Example: meshagent get policies --mesh shop -o json"
)
def get_policies(
    mesh: Annotated[str, typer.Option(metavar="NAME", help="The mesh.")],
    kind: Annotated[
        str | None, typer.Option(metavar="KIND", help="Only this kind, e.g. TrafficRoute.")
    ] = None,
    output: OutputOption = "table",
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """List a mesh's policies."""
    _check_output(output)
    params = {"kind": kind} if kind else {}
    with _client(central_url, central_ca, token_file) as client:
        policies = client.call("GET", f"/v1/meshes/{mesh}/policies", params=params)["policies"]
    if output == "json":
        _print_json(policies)
        return
    _print_table(
        ["KIND", "NAME", "DESTINATION", "VERSION"],
        [
            [p["kind"], p["name"], str(p["spec"].get("destination", "")), str(p["version"])]
            for p in policies
        ],
    )


@get_app.command(
    "dataplanes", cls=_Command, epilog="Example: meshagent get dataplanes --mesh shop -o json"
)
def get_dataplanes(
    mesh: Annotated[str, typer.Option(metavar="NAME", help="The mesh.")],
    output: OutputOption = "table",
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """List a mesh's dataplanes: online or not, config versions, certificates.

    SERVICES: "(unhealthy)" after one whose health probes fail: the built-in catalog
    leaves it out. STATUS: offline after three missed heartbeats (30 s).
    APPLIED/LATEST: its config version.
    CA: "current" when all its certificates come from the mesh's CA, "previous" when some
    do not (a CA rotation has not reached it yet), "?" before it has said. While a
    rotation distributes the new CA (the line below the table says so), "new-bundle"
    for a dataplane that has applied the new trust bundle, "bundle-pending" for one
    that has not: the new CA signs once no online dataplane is pending.

    A dataplane that refused its latest config says why below the table.
    """
    _check_output(output)
    with _client(central_url, central_ca, token_file) as client:
        answer = client.call("GET", f"/v1/meshes/{mesh}/dataplanes")
    dataplanes = answer["dataplanes"]
    if output == "json":
        _print_json(dataplanes)
        return
    _print_table(
        [
            "NAME",
            "NODE",
            "ADDRESS",
            "SERVICES",
            "STATUS",
            "APPLIED/LATEST",
            "CERT-EXPIRES",
            "CA",
        ],
        [_dataplane_row(d) for d in dataplanes],
    )
    for d in dataplanes:
        if d.get("last_error"):
            typer.echo(f"{d['name']}: config rejected: {d['last_error']}")
    phase = answer.get("ca_rotation_phase")
    if phase == "distributing":
        typer.echo(
            "CA rotation: distributing the new CA; the previous CA signs until every "
            "online dataplane has the new bundle"
        )
    elif phase == "renewing":
        typer.echo(
            "CA rotation: the new CA signs; agents are renewing; finish when every online "
            f"dataplane is current (meshagent mesh rotate-ca {mesh} --finish)"
        )


@get_app.command("tokens", cls=_Command, epilog="Example: meshagent get tokens --mesh shop")
def get_tokens(
    mesh: Annotated[str, typer.Option(metavar="NAME", help="The mesh.")],
    output: OutputOption = "table",
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """List a mesh's usable tokens: join tokens, and (for global admins) admin tokens
    scoped to it. Never their secrets. Revoke one with `meshagent delete token`.
    """
    _check_output(output)
    with _client(central_url, central_ca, token_file) as client:
        tokens = client.call("GET", f"/v1/meshes/{mesh}/tokens")["tokens"]
    if output == "json":
        _print_json(tokens)
        return
    _print_table(
        ["ID", "KIND", "SERVICES", "USES-LEFT", "EXPIRES", "CREATED"],
        [
            [
                t["id"],
                t["kind"],
                ",".join(t["services"]) or "-",
                "-" if t["uses_left"] is None else str(t["uses_left"]),
                _utc_minutes(t["expires_at"]),
                _utc_minutes(t["created_at"]),
            ]
            for t in tokens
        ],
    )


@get_app.command(
    "audit", cls=_Command, epilog="Example: meshagent get audit --mesh shop --limit 20"
)
def get_audit(
    mesh: Annotated[str, typer.Option(metavar="NAME", help="The mesh.")],
    limit: Annotated[int, typer.Option(min=1, help="The newest this many entries.")] = 100,
    output: OutputOption = "table",
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """Show a mesh's audit trail, newest first: when, which token (ACTOR is its id),
    what it did, to what."""
    _check_output(output)
    with _client(central_url, central_ca, token_file) as client:
        entries = client.call("GET", f"/v1/meshes/{mesh}/audit", params={"limit": limit})["entries"]
    if output == "json":
        _print_json(entries)
        return
    _print_table(
        ["TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"],
        [
            [_utc_seconds(e["at"]), e["actor"], e["action"], e["target"], e.get("detail", "")]
            for e in entries
        ],
    )


def _utc_seconds(epoch: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dataplane_row(view: dict[str, Any]) -> list[str]:
    status = "online" if view["online"] else "offline"
    if view.get("last_error"):
        status += ", rejected"
    return [
        view["name"],
        view["node"],
        view["address"],
        _services(view["services"], view.get("unhealthy") or []),
        status,
        f"{view['applied_version']}/{view['latest_version']}",
        _utc_minutes(view.get("cert_not_after")),
        _ca_state(view.get("on_current_ca"), view.get("has_new_bundle")),
    ]


def _services(services: list[str], unhealthy: list[str]) -> str:
    return ",".join(f"{s} (unhealthy)" if s in unhealthy else s for s in services)


def _ca_state(on_current: object, has_new_bundle: object = None) -> str:
    if has_new_bundle is not None:  # distributing a new CA
        return "new-bundle" if has_new_bundle else "bundle-pending"
    if on_current is None:
        return "?"
    return "current" if on_current else "previous"


def _utc_minutes(epoch: float | None) -> str:
    from datetime import UTC, datetime

    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%MZ")


delete_app = typer.Typer(
    cls=_Group,
    help="Delete policies, dataplanes and meshes.",
    epilog="Example: meshagent delete policy orders-migration --mesh shop --kind TrafficRoute",
    no_args_is_help=True,
    add_completion=False,
)


@delete_app.command(
    "policy",
    cls=_Command,
    epilog="Example: meshagent delete policy orders-migration --mesh shop --kind TrafficRoute",
)
def delete_policy(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The policy's name.")],
    mesh: Annotated[str, typer.Option(metavar="NAME", help="Its mesh.")],
    kind: Annotated[str, typer.Option(metavar="KIND", help="Its kind.")] = "TrafficRoute",
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """Delete one policy of a mesh."""
    with _client(central_url, central_ca, token_file) as client:
        client.call("DELETE", f"/v1/meshes/{mesh}/policies/{kind}/{name}")
    typer.echo(f"{mesh}: {kind}/{name} deleted")


@delete_app.command(
    "dataplane", cls=_Command, epilog="Example: meshagent delete dataplane vm-1 --mesh shop"
)
def delete_dataplane(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The dataplane's name.")],
    mesh: Annotated[str, typer.Option(metavar="NAME", help="Its mesh.")],
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """Delete a dataplane and its node credential (its agent must join again)."""
    with _client(central_url, central_ca, token_file) as client:
        client.call("DELETE", f"/v1/meshes/{mesh}/dataplanes/{name}")
    typer.echo(f"{mesh}: dataplane {name} deleted, with its node credential")


@delete_app.command(
    "token", cls=_Command, epilog="Example: meshagent delete token 5e0c91a2b7d4 --mesh shop"
)
def delete_token(
    token_id: Annotated[
        str, typer.Argument(metavar="ID", help="The token's id (meshagent get tokens).")
    ],
    mesh: Annotated[str, typer.Option(metavar="NAME", help="Its mesh.")],
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """Revoke a join token (or, as a global admin, a mesh-scoped admin token) at once.
    Agents that already joined keep their node credential: delete the dataplane too to
    shut one out."""
    with _client(central_url, central_ca, token_file) as client:
        client.call("DELETE", f"/v1/meshes/{mesh}/tokens/{token_id}")
    typer.echo(f"{mesh}: token {token_id} revoked")


@delete_app.command("mesh", cls=_Command, epilog="Example: meshagent delete mesh shop --yes")
def delete_mesh(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The mesh.")],
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: its policies and tokens go with it.")
    ] = False,
    central_url: CentralOption = None,
    central_ca: CaOption = None,
    token_file: TokenOption = None,
) -> None:
    """Delete a mesh with its CA, policies and tokens (global admins)."""
    if not yes:
        _fail(f"deleting mesh {name} deletes its CA, policies and tokens; add --yes")
    with _client(central_url, central_ca, token_file) as client:
        client.call("DELETE", f"/v1/meshes/{name}")
    typer.echo(f"mesh {name} deleted")


def register(app: typer.Typer) -> None:
    """Add these commands to the ``meshagent`` app."""
    app.command(
        "central",
        cls=_Command,
        epilog="Example: meshagent central --config /etc/meshagent/central.toml",
    )(central)
    app.command("apply", cls=_Command)(apply)  # its example is in its docstring
    app.add_typer(mesh_app, name="mesh")
    app.add_typer(token_app, name="token")
    app.add_typer(get_app, name="get")
    app.add_typer(delete_app, name="delete")

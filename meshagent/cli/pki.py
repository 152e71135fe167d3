"""``meshagent pki``: create a mesh CA and issue service certificates by hand.

Every user error is one line on stderr starting with ``error: `` and exit code 1,
including command-line usage errors (missing or unknown options).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from cryptography import x509
from typer.core import TyperCommand, TyperGroup

from meshagent.config.duration import parse_duration
from meshagent.pki.ca import create_ca, issue_leaf
from meshagent.pki.files import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    PkiError,
    load_ca,
    write_private_file,
    write_public_file,
)
from meshagent.pki.identity import NAME_RULE, is_valid_name, spiffe_id


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _usage_error(ctx: Any, exc: typer.TyperException) -> NoReturn:
    text = " ".join(exc.format_message().split()).rstrip(".")
    _fail(f"{text[:1].lower()}{text[1:]} — see: {ctx.command_path} --help")


class _Command(TyperCommand):
    """Reports usage errors (missing, unknown or bad options) as one ``error:`` line."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except typer.TyperException as exc:
            _usage_error(ctx, exc)


class _Group(TyperGroup):
    """Reports an unknown sub-command as one ``error:`` line."""

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except typer.TyperException as exc:
            _usage_error(ctx, exc)


pki_app = typer.Typer(
    cls=_Group,
    help=(
        "Create a mesh CA and issue service certificates, without a central agent. "
        "Service keys are generated on the host that runs this command."
    ),
    epilog="Example: meshagent pki init-ca --mesh shop --out /etc/meshagent/ca",
    no_args_is_help=True,
    add_completion=False,
)


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except (PkiError, ValueError) as exc:
        _fail(str(exc))


def _name(option: str, value: str) -> str:
    if not is_valid_name(value):
        _fail(f'{option}: invalid name "{value}": use {NAME_RULE}')
    return value


def _duration(option: str, text: str) -> timedelta:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        _fail(f"{option}: {exc}")
    if seconds <= 0:
        _fail(f'{option}: must be more than 0, e.g. "720h"')
    latest = datetime.max.replace(tzinfo=UTC) - datetime.now(UTC)
    if seconds >= latest.total_seconds():
        _fail(f'{option}: "{text}" is too long')
    return timedelta(seconds=seconds)


def _refuse_overwrite(paths: list[Path], force: bool, consequence: str) -> None:
    for path in paths:
        if not force and (path.exists() or path.is_symlink()):
            _fail(f"{path} already exists — pass --force to replace it ({consequence})")


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"{directory}: cannot create the directory: {exc.strerror or exc}")


def _until(cert_pem: bytes) -> str:
    return f"{x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


@pki_app.command(
    "init-ca",
    cls=_Command,
    epilog="Example: meshagent pki init-ca --mesh shop --out /etc/meshagent/ca",
)
def init_ca(
    mesh: Annotated[
        str, typer.Option(metavar="NAME", help="Mesh name; the CA's trust domain is spiffe://NAME.")
    ],
    out: Annotated[
        Path,
        typer.Option(metavar="DIR", help="Where to write ca.pem and ca-key.pem (made 0700)."),
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing CA.")] = False,
    valid_for: Annotated[
        str, typer.Option(metavar="DURATION", help='CA lifetime, e.g. "3650d".')
    ] = "3650d",
) -> None:
    """Create the mesh CA: a certificate (0644) and its private key (0600).

    Keep ca-key.pem on the host that issues certificates; agents need only ca.pem.
    """
    _name("--mesh", mesh)
    lifetime = _duration("--valid-for", valid_for)
    cert_path, key_path = out / CA_CERT_FILE, out / CA_KEY_FILE
    _refuse_overwrite(
        [cert_path, key_path], force, "certificates issued by the old CA stop being trusted"
    )
    with _user_errors():
        pair = create_ca(mesh, now=datetime.now(UTC), valid_for=lifetime)
        _make_dir(out)
        write_private_file(key_path, pair.key_pem)
        write_public_file(cert_path, pair.cert_pem)
    typer.echo(f"wrote {cert_path} (CA for spiffe://{mesh}, valid until {_until(pair.cert_pem)})")
    typer.echo(f"wrote {key_path} (CA private key, mode 0600; keep it off agent hosts)")


@pki_app.command(
    "issue",
    cls=_Command,
    epilog=(
        "Example: meshagent pki issue --ca /etc/meshagent/ca --mesh shop --service web "
        "--out /etc/meshagent/certs"
    ),
)
def issue(
    ca: Annotated[
        Path, typer.Option(metavar="DIR", help="The CA directory (ca.pem and ca-key.pem).")
    ],
    mesh: Annotated[str, typer.Option(metavar="NAME", help="Mesh name; must be the CA's.")],
    service: Annotated[str, typer.Option(metavar="NAME", help="Service to issue for.")],
    out: Annotated[
        Path,
        typer.Option(metavar="DIR", help="Where to write SERVICE.pem and SERVICE-key.pem."),
    ],
    ttl: Annotated[
        str, typer.Option(metavar="DURATION", help='Certificate lifetime, e.g. "720h".')
    ] = "720h",
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Issue a certificate (0644) and a new private key (0600) for one service.

    The certificate names spiffe://MESH/service/SERVICE. Certificates issued here
    are NOT renewed automatically (that needs the central agent): the agent warns
    before one expires, and you reissue it with this command.
    """
    _name("--mesh", mesh)
    _name("--service", service)
    lifetime = _duration("--ttl", ttl)
    cert_path, key_path = out / f"{service}.pem", out / f"{service}-key.pem"
    _refuse_overwrite([cert_path, key_path], force, "the old key and certificate are lost")
    with _user_errors():
        pair = issue_leaf(load_ca(ca), mesh, service, now=datetime.now(UTC), ttl=lifetime)
        _make_dir(out)
        write_private_file(key_path, pair.key_pem)
        write_public_file(cert_path, pair.cert_pem)
    until = _until(pair.cert_pem)
    typer.echo(f"wrote {cert_path} ({spiffe_id(mesh, service)}, valid until {until})")
    typer.echo(f"wrote {key_path} (private key, mode 0600)")
    typer.echo(f"not renewed automatically: reissue before {until}")

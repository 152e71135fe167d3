"""``meshagent pki init-ca`` and ``meshagent pki issue``, through typer's CliRunner."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from cryptography import x509
from typer.testing import CliRunner, Result

from meshagent.cli.pki import pki_app
from meshagent.pki.ca import ca_trust_domain
from meshagent.pki.files import check_identity_files


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(pki_app, [str(arg) for arg in args])


def assert_user_error(result: Result, fragment: str) -> None:
    """One line on stderr starting with "error: ", nothing on stdout, exit code 1."""
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr, result.stderr
    assert result.stdout == ""
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def lifetime(path: Path) -> timedelta:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def flat(text: str) -> str:
    """Help text with rich's wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    out = tmp_path / "ca"
    assert run("init-ca", "--mesh", "shop", "--out", out).exit_code == 0
    return out


def issue(ca_dir: Path, out: Path, *extra: str, service: str = "web", mesh: str = "shop") -> Result:
    return run("issue", "--ca", ca_dir, "--mesh", mesh, "--service", service, "--out", out, *extra)


# --- init-ca ------------------------------------------------------------------------


def test_init_ca_writes_cert_and_private_key(tmp_path: Path) -> None:
    out = tmp_path / "new" / "ca"
    result = run("init-ca", "--mesh", "shop", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'ca.pem'}" in result.stdout
    assert f"wrote {out / 'ca-key.pem'}" in result.stdout
    assert mode(out) == 0o700
    assert mode(out / "ca.pem") == 0o644
    assert mode(out / "ca-key.pem") == 0o600
    assert ca_trust_domain((out / "ca.pem").read_bytes()) == "shop"
    assert lifetime(out / "ca.pem") == timedelta(days=3650, minutes=5)


def test_init_ca_valid_for(tmp_path: Path) -> None:
    assert run("init-ca", "--mesh", "shop", "--out", tmp_path, "--valid-for", "30d").exit_code == 0
    assert lifetime(tmp_path / "ca.pem") == timedelta(days=30, minutes=5)


def test_init_ca_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    before = (ca_dir / "ca.pem").read_bytes()
    result = run("init-ca", "--mesh", "shop", "--out", ca_dir)
    assert_user_error(result, f"{ca_dir / 'ca.pem'} already exists — pass --force")
    assert (ca_dir / "ca.pem").read_bytes() == before
    assert run("init-ca", "--mesh", "shop", "--out", ca_dir, "--force").exit_code == 0
    assert (ca_dir / "ca.pem").read_bytes() != before


def test_init_ca_refuses_when_only_the_key_exists(tmp_path: Path) -> None:
    (tmp_path / "ca-key.pem").write_bytes(b"precious")
    assert_user_error(run("init-ca", "--mesh", "shop", "--out", tmp_path), "ca-key.pem already")
    assert (tmp_path / "ca-key.pem").read_bytes() == b"precious"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--mesh", "Shop"], '--mesh: invalid name "Shop"'),
        (["--mesh", "shop", "--valid-for", "10"], '--valid-for: invalid duration "10"'),
        (["--mesh", "shop", "--valid-for", "0d"], "--valid-for: must be more than 0"),
        (["--mesh", "shop", "--valid-for", "99999999d"], '--valid-for: "99999999d" is too long'),
    ],
)
def test_init_ca_user_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    assert_user_error(run("init-ca", "--out", tmp_path / "ca", *args), fragment)
    assert not (tmp_path / "ca").exists()


def test_init_ca_out_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = run("init-ca", "--mesh", "shop", "--out", tmp_path / "file")
    assert_user_error(result, f"{tmp_path / 'file'}: cannot create the directory")


# --- issue --------------------------------------------------------------------------


def test_issue_writes_a_checked_identity(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = issue(ca_dir, out)
    assert result.exit_code == 0, result.output
    cert, key = out / "web.pem", out / "web-key.pem"
    assert f"wrote {cert} (spiffe://shop/service/web, valid until" in result.stdout
    assert f"wrote {key}" in result.stdout
    assert "not renewed automatically" in result.stdout
    assert mode(key) == 0o600 and mode(cert) == 0o644
    assert cert.read_bytes().count(b"-----BEGIN CERTIFICATE-----") == 1  # the leaf alone
    checked = check_identity_files(
        ca_dir / "ca.pem", cert, key, mesh="shop", service="web", now=datetime.now(UTC)
    )
    assert checked.spiffe_id == "spiffe://shop/service/web"
    assert lifetime(cert) == timedelta(hours=720, minutes=5)


def test_issue_ttl(ca_dir: Path, tmp_path: Path) -> None:
    assert issue(ca_dir, tmp_path, "--ttl", "24h").exit_code == 0
    assert lifetime(tmp_path / "web.pem") == timedelta(hours=24, minutes=5)


def test_issue_refuses_to_overwrite_without_force(ca_dir: Path, tmp_path: Path) -> None:
    assert issue(ca_dir, tmp_path).exit_code == 0
    before = (tmp_path / "web-key.pem").read_bytes()
    assert_user_error(issue(ca_dir, tmp_path), f"{tmp_path / 'web.pem'} already exists")
    assert (tmp_path / "web-key.pem").read_bytes() == before
    assert issue(ca_dir, tmp_path, "--force").exit_code == 0
    assert (tmp_path / "web-key.pem").read_bytes() != before


@pytest.mark.parametrize(
    ("extra", "service", "mesh", "fragment"),
    [
        ([], "web", "other", 'refusing to issue for mesh "other": this CA is for mesh "shop"'),
        ([], "Web", "shop", '--service: invalid name "Web"'),
        ([], "web", "a_b", '--mesh: invalid name "a_b"'),
        (["--ttl", "5"], "web", "shop", '--ttl: invalid duration "5"'),
        (["--ttl", "-5h"], "web", "shop", '--ttl: invalid duration "-5h"'),
        (["--ttl", "0s"], "web", "shop", "--ttl: must be more than 0"),
    ],
)
def test_issue_user_errors(
    ca_dir: Path, tmp_path: Path, extra: list[str], service: str, mesh: str, fragment: str
) -> None:
    out = tmp_path / "certs"
    assert_user_error(issue(ca_dir, out, *extra, service=service, mesh=mesh), fragment)
    assert not out.exists()


def test_issue_without_a_ca(tmp_path: Path) -> None:
    result = issue(tmp_path / "nope", tmp_path / "certs")
    assert_user_error(result, f"{tmp_path / 'nope' / 'ca.pem'}: no such file — create a CA with")


def test_issue_with_a_garbage_ca(ca_dir: Path, tmp_path: Path) -> None:
    (ca_dir / "ca-key.pem").write_bytes(b"garbage")
    result = issue(ca_dir, tmp_path / "certs")
    assert_user_error(result, f"{ca_dir / 'ca-key.pem'}: not a PEM private key")


# --- usage errors and help ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["issue", "--mesh", "shop"], "missing option"),
        (["issue", "--bogus"], "no such option: --bogus"),
        (["init-ca", "--mesh"], "option '--mesh' requires an argument"),
        (["bogus"], "no such command 'bogus'"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], fragment: str) -> None:
    assert_user_error(run(*args), fragment)


def test_usage_errors_are_one_line_under_a_parent_app() -> None:
    root = typer.Typer()
    root.add_typer(pki_app, name="pki")
    for args in (["pki", "bogus"], ["pki", "issue", "--ca"]):
        result = CliRunner().invoke(root, args)
        assert_user_error(result, "see: ")


@pytest.mark.parametrize("command", ["init-ca", "issue"])
def test_help_has_an_example(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert f"Example: meshagent pki {command} --" in flat(result.stdout)


def test_issue_help_explains_renewal() -> None:
    text = flat(run("issue", "--help").stdout)
    assert "NOT renewed automatically" in text
    assert "the agent warns before one expires" in text
    assert "[default: 720h]" in text


def test_no_arguments_shows_help() -> None:
    result = run()
    assert "init-ca" in result.stdout and "issue" in result.stdout

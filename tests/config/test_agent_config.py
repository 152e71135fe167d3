"""agent.toml: strict shape, meaningful checks, one-line errors that name key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshagent.config.agent import AgentConfig, initial_snapshot, load_agent_config, validate_agent
from meshagent.config.load import ConfigError, convert, load_toml

GOOD = """
mesh = "shop"
address = "127.0.0.2"
[consul]
address = "http://127.0.0.1:8500"
[tls]
ca = "ca.pem"
cert = "web.pem"
key = "web-key.pem"
[[inbound]]
service = "web"
port = 15443
app_port = 8080
tags = { version = "v1" }
health = { tcp = true, interval = "5s" }
[[outbound]]
service = "orders"
port = 16001
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, GOOD))
    assert config.inbound[0].health.interval == 5.0
    assert config.limits.connect_timeout == 5.0
    assert config.outbound_source(config.outbound[0]) == "web"
    snap = initial_snapshot(config)
    assert snap.inbounds[0].bind == "127.0.0.2"
    assert snap.outbounds[0].bind == "127.0.0.1"
    assert snap.outbounds[0].source == "web"
    assert snap.inbounds[0].app_host == "127.0.0.1"


@pytest.mark.parametrize("host", ["10.0.0.12", "127.0.0.3", "::1", "fd00::12"])
def test_app_host_reaches_the_snapshot(tmp_path: Path, host: str) -> None:
    text = GOOD.replace("app_port = 8080", f'app_port = 8080\napp_host = "{host}"', 1)
    snap = initial_snapshot(load_agent_config(write(tmp_path, text)))
    assert snap.inbounds[0].app_host == host
    assert snap.inbounds[0].app_port == 8080


def test_examples_agent_toml_is_valid() -> None:
    path = Path(__file__).parents[2] / "examples" / "agent.toml"
    config = load_toml(path, AgentConfig)
    assert validate_agent(config) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("port = 15443", "prot = 15443"), "inbound[0]: unknown key `prot` (check the spelling"),
        (("port = 16001", 'port = "16001"'), "outbound[0].port: Expected `int`, got `str`"),
        (('interval = "5s"', 'interval = "5 seconds"'), 'inbound[0].health.interval: invalid duration'),
        (("port = 16001", "port = 15443\nbind = \"127.0.0.2\""), "outbound[0].port: port 15443 is also used by inbound[0].port"),
        (('mesh = "shop"', 'mesh = "Shop!"'), "mesh: 'Shop!' is not a valid name"),
        (("port = 16001", "port = 70000"), "outbound[0].port: 70000 is not a TCP port"),
        (("app_port = 8080", "app_port = 0"), "inbound[0].app_port: 0 is not a TCP port"),
        (("app_port = 8080", 'app_port = 8080\napp_host = "monolith.local"'), "inbound[0].app_host: 'monolith.local' is not an IP address; give the address the app listens on"),
        (("app_port = 8080", 'app_port = 8080\napp_host = "0.0.0.0"'), "inbound[0].app_host: '0.0.0.0' means every address"),
        (("app_port = 8080", 'app_port = 8080\napp_host = "::"'), "inbound[0].app_host: '::' means every address"),
        (("app_port = 8080", 'app_port = 8080\napp_host = "224.0.0.1"'), "inbound[0].app_host: '224.0.0.1' is a multicast address"),
        (("app_port = 8080", "app_port = 8080\napp_host = 10"), "inbound[0].app_host: Expected `str`, got `int`"),
        (("app_port = 8080", "app_port = 16001"), "inbound[0].app_port: 127.0.0.1:16001 is this agent's own listener (outbound[0].port), not the app's; the agent would connect to itself"),
        (("app_port = 8080", 'app_port = 15443\napp_host = "127.0.0.2"'), "inbound[0].app_port: 127.0.0.2:15443 is this agent's own listener (inbound[0].port)"),
        (('address = "127.0.0.2"', 'address = "vm-12.example"'), "address: 'vm-12.example' is not an IP address"),
        (("[consul]\naddress = \"http://127.0.0.1:8500\"", ""), "outbound[0]: no endpoints, no [consul] and no [central]"),
        (('health = { tcp = true, interval = "5s" }', 'health = { http = "healthz" }'), "must be a path"),
        (('mesh = "shop"', 'mesh = "shop"\nworkers = 0'), 'workers: 0 must be "auto" or 1-256'),
        (('mesh = "shop"', 'mesh = "shop"\nworkers = "all"'), "workers: 'all' must be \"auto\" or 1-256"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(tmp_path, GOOD.replace(old, new, 1)))
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(str(tmp_path / "agent.toml") + ": ")
    assert message in text


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inbound\\[0\\]: missing required key `app_port`"):
        load_agent_config(write(tmp_path, GOOD.replace("app_port = 8080\n", "")))


def test_missing_tls_is_explained(tmp_path: Path) -> None:
    text = GOOD.replace('[tls]\nca = "ca.pem"\ncert = "web.pem"\nkey = "web-key.pem"\n', "")
    with pytest.raises(ConfigError, match=r"tls: missing; add \[tls\]"):
        load_agent_config(write(tmp_path, text))


def test_two_inbounds_need_an_outbound_source(tmp_path: Path) -> None:
    text = GOOD + '[[inbound]]\nservice = "admin"\nport = 15444\napp_port = 8081\n'
    with pytest.raises(ConfigError, match=r"outbound\[0\].source: this host fronts 2 services"):
        load_agent_config(write(tmp_path, text))
    ok = text.replace("port = 16001", 'port = 16001\nsource = "admin"')
    assert load_agent_config(write(tmp_path, ok)).outbound_source(
        load_agent_config(write(tmp_path, ok)).outbound[0]
    ) == "admin"


def test_per_inbound_identity(tmp_path: Path) -> None:
    text = GOOD.replace("app_port = 8080", 'app_port = 8080\ncert = "w.pem"\nkey = "w-key.pem"')
    config = load_agent_config(write(tmp_path, text))
    files = config.identity_files("web")
    assert files is not None and files.cert == "w.pem" and files.ca == "ca.pem"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), ("mesh = ", "not valid TOML"), (b"\xff\xfe", "not UTF-8")],
)
def test_unreadable_files(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    path = tmp_path / "agent.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_agent_config(path)


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    text = GOOD.replace('mesh = "shop"', 'mesh = "S"').replace("port = 16001", "port = 0")
    config = load_toml(write(tmp_path, text), AgentConfig)
    assert len(validate_agent(config)) == 2


def test_static_endpoints_need_no_consul(tmp_path: Path) -> None:
    text = GOOD.replace('[consul]\naddress = "http://127.0.0.1:8500"\n', "")
    text = text.replace("port = 16001", 'port = 16001\nendpoints = ["127.0.0.3:15443"]')
    snap = initial_snapshot(load_agent_config(write(tmp_path, text)))
    assert [e.address for e in snap.endpoints_of("orders")] == ["127.0.0.3:15443"]
    bad = text.replace("127.0.0.3:15443", "orders:15443")
    with pytest.raises(ConfigError, match="endpoints\\[0\\]: 'orders:15443' is not host:port"):
        load_agent_config(write(tmp_path, bad))


CENTRAL = """
mesh = "shop"
node = "vm-1"
address = "127.0.0.2"
state_dir = "/var/lib/meshagent"
[central]
url = "https://central:5681"
ca = "central-ca.pem"
token_file = "join.token"
[[inbound]]
service = "web"
port = 15443
app_port = 8080
[[outbound]]
service = "orders"
port = 16001
"""


def test_central_config_needs_no_tls_and_keeps_certificates_under_state_dir(
    tmp_path: Path,
) -> None:
    config = load_agent_config(write(tmp_path, CENTRAL))
    assert config.dataplane_name == "vm-1"
    assert config.identities() == ["web"]
    files = config.identity_files("web")
    assert files is not None
    assert files.cert == files.key == "/var/lib/meshagent/central/web.pem"
    assert files.ca == "/var/lib/meshagent/central/ca.pem"
    assert config.identity_files("orders") is None


def test_central_url_takes_one_url_or_a_list_of_replicas(tmp_path: Path) -> None:
    one = load_agent_config(write(tmp_path, CENTRAL))
    assert one.central is not None and one.central.urls == ("https://central:5681",)
    listed = load_agent_config(write(tmp_path, CENTRAL.replace(
        'url = "https://central:5681"',
        'url = ["https://10.0.0.5:5681/", "https://10.0.0.6:5681"]',
    )))
    assert listed.central is not None
    assert listed.central.urls == ("https://10.0.0.5:5681", "https://10.0.0.6:5681")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("[]", "central.url: the list is empty; give the central agent's URL, or one per replica"),
        ('["https://a:5681", "http://b:5681"]', "central.url[1]: 'http://b:5681' must be an https:// URL"),
        ('["https://a:5681", "https://a:5681/"]', "central.url[1]: 'https://a:5681/' is listed twice"),
        ("5681", "central.url"),
    ],
)
def test_bad_central_url_lists_name_the_field(tmp_path: Path, url: str, message: str) -> None:
    text = CENTRAL.replace('url = "https://central:5681"', f"url = {url}")
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(tmp_path, text))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('state_dir = "/var/lib/meshagent"\n', ""), "state_dir: required with [central]"),
        (("https://central", "http://central"), "central.url: 'http://central:5681' must be an https"),
        (("[central]", '[tls]\nca = "a"\ncert = "b"\nkey = "c"\n[central]'), "tls: remove it"),
        (('mesh = "shop"', 'mesh = "shop"\npolicies = "p"'), "policies: remove it"),
        (("app_port = 8080", 'app_port = 8080\ncert = "w.pem"\nkey = "k.pem"'), "inbound: remove cert/key"),
        (('node = "vm-1"', 'node = "VM_1"'), "node: 'VM_1' is not a valid dataplane name; set central.dataplane"),
        (('token_file = "join.token"', 'token_file = "j"\ndataplane = "x y"'), "central.dataplane: 'x y'"),
        (('token_file = "join.token"', 'token_file = "j"\njoin_timeout = "0s"'), "central.join_timeout"),
    ],
)
def test_bad_central_configs_name_the_key(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    old, new = edit
    assert old in CENTRAL
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(tmp_path, CENTRAL.replace(old, new, 1)))
    assert message in str(info.value)


def test_a_key_with_control_characters_is_named_on_one_line() -> None:
    # Found by the central API's fuzz test: a JSON body {"\n": null} was answered
    # "unknown key `<newline>`", an error of two lines.
    with pytest.raises(ConfigError) as caught:
        convert({"\n\t": None}, AgentConfig, source="request body")
    message = str(caught.value)
    assert "\n" not in message and "\t" not in message
    assert "unknown key `\\n\\t`" in message, message

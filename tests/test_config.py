"""Config errors name the file, the line and the key; defaults need no file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tproxy import config
from tproxy.config import ConfigError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tproxy.toml"
    path.write_text(text)
    return str(path)


def errors_of(path: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return str(info.value).splitlines()


def test_defaults_without_a_file() -> None:
    cfg = config.load(None)
    assert cfg.proxy.ports == (80,)
    assert cfg.proxy.transparent_upstream is True
    assert cfg.rules.route_table == 100


def test_valid_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[proxy]
lan_interfaces = ["eth1", "wlan0"]
ports = [80, 8080]
connect_timeout = "2500ms"
idle_timeout = "2m"

[rules]
bypass_clients = ["10.0.0.5", "fd00::/64"]
bypass_destinations = ["192.0.2.0/24"]

[log]
access_log = ""
""",
    )
    cfg = config.load(path)
    assert cfg.proxy.lan_interfaces == ("eth1", "wlan0")
    assert cfg.proxy.ports == (80, 8080)
    assert cfg.proxy.connect_timeout == 2.5
    assert cfg.proxy.idle_timeout == 120.0
    assert [str(n) for n in cfg.rules.bypass_clients] == ["10.0.0.5/32", "fd00::/64"]
    assert cfg.log.access_log == ""


def test_every_error_has_file_line_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """[proxy]
lan_interfaces = ["eth1"]
ports = [80, 70000]
idle_timout = 5
connect_timeout = "soon"

[rules]
bypass_clients = ["10.0.0.0/8", "not-a-net"]
route_table = 254
""",
    )
    errs = errors_of(path)
    assert f"{path}:3: proxy.ports[1]: not a TCP port: 70000" in errs
    assert f"{path}:4: proxy.idle_timout: unknown key (did you mean idle_timeout?)" in errs
    assert any(e.startswith(f"{path}:5: proxy.connect_timeout: not a duration") for e in errs)
    assert f"{path}:8: rules.bypass_clients[1]: not an IP address or CIDR: 'not-a-net'" in errs
    assert any(e.startswith(f"{path}:9: rules.route_table:") for e in errs)
    assert len(errs) == 5


def test_wrong_types_are_named(tmp_path: Path) -> None:
    path = write(tmp_path, '[proxy]\nipv6 = "yes"\nlisten_port = true\n')
    errs = errors_of(path)
    assert f"{path}:2: proxy.ipv6: expected true or false, got 'yes'" in errs
    assert f"{path}:3: proxy.listen_port: expected an integer, got True" in errs


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[proxi]\nports = [80]\n")
    assert errors_of(path) == [f"{path}:1: proxi: unknown section (did you mean [proxy]?)"]


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[proxy]\nports = [80,\nlisten_port = \n")
    (err,) = errors_of(path)
    assert err.startswith(f"{path}:3: TOML syntax error")


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    assert errors_of(missing) == [f"{missing}: no such file"]


def test_overrides_win_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[proxy]\nlan_interfaces = ["eth1"]\nlisten_port = 4000\n')
    cfg = config.with_overrides(config.load(path), lan_interfaces=("lan9",), listen_port=None)
    assert cfg.proxy.lan_interfaces == ("lan9",)
    assert cfg.proxy.listen_port == 4000


@pytest.mark.parametrize(
    ("text", "value"),
    [('"2mbit"', 2_000_000), ('"500kbit"', 500_000), ('"1mbps"', 8_000_000), ("64000", 64000)],
)
def test_rates(text: str, value: int) -> None:
    r = config.Reader({"rate": tomllib.loads(f"x = {text}")["x"]}, "f")
    assert r.rate("rate", 1) == value
    assert not r.errors


@pytest.mark.parametrize(
    ("text", "value"),
    [('"64MiB"', 64 * 1024**2), ('"1GB"', 10**9), ('"512k"', 512_000), ("4096", 4096)],
)
def test_sizes(text: str, value: int) -> None:
    r = config.Reader({"size": tomllib.loads(f"x = {text}")["x"]}, "f")
    assert r.size("size", 1) == value
    assert not r.errors


def test_named_tables_report_duplicate_names_with_their_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[filter.group]]\nname = "kids"\ncidrs = ["10.0.0.0/24"]\n'
        '[[filter.group]]\nname = "kids"\ncidrs = ["10.0.1.0/24"]\n',
    )
    assert f"{path}:5: filter.group[1].name: duplicate group name 'kids'" in errors_of(path)


def test_section_gives_the_parsed_table_or_its_defaults(tmp_path: Path) -> None:
    from tproxy.control import ControlConfig
    from tproxy.limits import LimitsConfig

    path = tmp_path / "t.toml"
    path.write_text('[proxy]\nlan_interfaces = ["lan0"]\n[control]\nsocket = "/tmp/x.sock"\n')
    cfg = config.load(str(path))
    assert cfg.section("control", ControlConfig).socket == "/tmp/x.sock"
    assert cfg.section("limits", LimitsConfig) == LimitsConfig()  # absent from the file
    # A section registered by no imported module: its defaults, of the asked type.
    assert config.Config().section("control", ControlConfig) == ControlConfig()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # TOML's nan passes every range check (each comparison is false); it hung requests.
        ("[proxy]\nconnect_timeout = nan\n", ":2: proxy.connect_timeout: must be a finite"),
        ("[proxy]\ndrain_timeout = inf\n", ":2: proxy.drain_timeout: must be a finite"),
        ("[proxy]\nidle_timeout = 1e300\n", ":2: proxy.idle_timeout: must be at most 365d"),
        ("[cache]\nheuristic_fraction = nan\n", ":2: cache.heuristic_fraction: must be a finite"),
        ("[limits]\nper_client_requests_per_second = inf\n", "must be a finite number"),
        ('[cache]\nmemory_size = "0.5"\n', ":2: cache.memory_size: not a whole number of bytes"),
        (
            '[rules]\nbypass_clients = ["192.168.1.5/24"]\n',
            "write '192.168.1.0/24' for the network",
        ),
        ('[rules]\nbypass_clients = ["fe80::1%eth0"]\n', "an address with a zone"),
        ('[rules]\nbypass_clients = ["::ffff:10.0.0.5"]\n', "write the IPv4 form '10.0.0.5'"),
        ('[proxy]\nlan_interfaces = ["eth1", "eth1"]\n', "lan_interfaces[1]: 'eth1' is listed"),
        ("[proxy]\nports = [80, 8080, 80]\n", ":2: proxy.ports[2]: port 80 is listed twice"),
        ("[rules]\nfwmark = 0x2\nfwmark_mask = 0x2\n", ":3: rules.fwmark_mask: 0x2 overlaps"),
        ("[rules]\nfwmark = 0x20\nfwmark_mask = 0x20\n", ":3: rules.fwmark_mask: 0x20 overlaps"),
        ("[[proxy]]\nports = [80]\n", ":1: proxy: expected a table"),
    ],
)
def test_values_the_daemon_would_misuse_are_refused_with_their_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert any(expected in e for e in errors_of(write(tmp_path, text))), errors_of(
        write(tmp_path, text)
    )


def test_shaping_slot_bits_are_refused_only_with_shaping_classes(tmp_path: Path) -> None:
    rules = "[rules]\nfwmark = 0x10000\nfwmark_mask = 0x10000\n"
    assert config.load(write(tmp_path, rules)).rules.fwmark_mask == 0x10000
    shaping = '[shaping]\nenabled = true\n[[shaping.class]]\nname = "web"\nrate = "10mbit"\n'
    errors = errors_of(write(tmp_path, rules + shaping))
    assert any(":3: rules.fwmark_mask: 0x10000 overlaps the bits shaping" in e for e in errors)


def test_a_duplicate_key_in_a_later_array_table_is_named_where_it_is(tmp_path: Path) -> None:
    text = (
        '[[filter.rule]]\ngroup = "*"\naction = "deny"\ndomains = ["a.example"]\n\n'
        '[[filter.rule]]\ngroup = "*"\naction = "deny"\ndomains = ["b.example"]\n'
        'action = "allow"\n'
    )
    assert errors_of(write(tmp_path, text)) == [
        f"{tmp_path}/tproxy.toml:10: filter.rule[1].action: set twice (first on line 8); keep one"
    ]


def test_a_byte_order_mark_is_not_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_text("\ufeff[proxy]\nlisten_port = 3130\n", encoding="utf-8")
    assert config.load(path).proxy.listen_port == 3130


@pytest.mark.parametrize(
    ("text", "value"),
    [("4.1MB", 4_100_000), ("8.2M", 8_200_000), ("64.4k", 64_400), ("1.5KiB", 1536)],
)
def test_decimal_sizes_are_whole_bytes_despite_float_rounding(
    tmp_path: Path, text: str, value: int
) -> None:
    cfg = config.load(write(tmp_path, f'[cache]\nmax_object_size = "{text}"\n'))
    assert cfg.section("cache", object).max_object_size == value  # type: ignore[attr-defined]

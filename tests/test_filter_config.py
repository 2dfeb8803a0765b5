"""The [filter] config section: parsing, defaults and precise error keys."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import tproxy.filter  # noqa: F401  (registers the section)
from tproxy import config
from tproxy.config import ConfigErrors, Reader, locate_keys
from tproxy.filter.component import load_files
from tproxy.filter.model import FilterConfig, HourRange, parse_filter


def parse(text: str) -> tuple[FilterConfig, list[str]]:
    data = tomllib.loads(text)
    r = Reader(data.get("filter", {}), "t.toml", "filter", locate_keys(text))
    cfg = parse_filter(r)
    return cfg, [f"{e.key}: {e.reason}" for e in r.errors]


def errors_for(text: str) -> dict[str, str]:
    _, errors = parse(text)
    return dict(e.split(": ", 1) for e in errors)


def file_errors(text: str) -> list[str]:
    """The problems the loader finds with the folders and files a (valid) config names."""
    cfg, errors = parse(text)
    assert errors == []
    try:
        load_files(cfg)
    except ConfigErrors as exc:
        return str(exc).splitlines()
    return []


def test_defaults() -> None:
    cfg, errors = parse("")
    assert errors == []
    assert cfg == FilterConfig()
    assert cfg.default == "allow" and cfg.sni_default == "allow" and cfg.https
    assert cfg.quic_reject == "auto" and cfg.block_template is None


FULL = """
[filter]
default = "deny"
sni_default = "deny"
quic_reject = true
https = false

[[filter.group]]
name = "kids"
cidrs = ["192.168.10.0/24", "fd00:10::/64"]
macs = ["02-00-00-00-00-0A"]
default = "allow"

[[filter.window]]
name = "night"
days = ["Fri", "sat"]
hours = "22:00-06:30"

[[filter.window]]
name = "split"
hours = ["08:00-12:00", "13:00-24:00"]

[[filter.rule]]
group = "kids"
action = "deny"
window = "night"
description = "no games at night"
domains = ["Games.Example.", "=exact.example", "bücher.example"]
url_prefix = ["Example.COM/Ads/", "http://x.example"]
url_regex = ["^http://[^/]+/track\\\\?"]
methods = ["post", "PUT"]
user_agent = "(?i)curl"
mime = ["video/*", "Application/X-MSDownload"]
extensions = ["exe", ".MSI"]
max_response_size = "50MiB"

[[filter.rule]]
group = "*"
action = "allow"
"""


def test_full_section() -> None:
    cfg, errors = parse(FULL)
    assert errors == []
    assert cfg.default == "deny" and cfg.sni_default == "deny" and not cfg.https
    assert cfg.quic_reject == "true"
    (kids,) = cfg.groups
    assert kids.macs == frozenset({"02:00:00:00:00:0a"}) and kids.default == "allow"
    assert [str(n) for n in kids.cidrs] == ["192.168.10.0/24", "fd00:10::/64"]
    night, split = cfg.windows
    assert night.days == frozenset({4, 5}) and night.hours == (HourRange(22 * 60, 6 * 60 + 30),)
    assert night.hours[0].wraps
    assert split.days == frozenset(range(7)) and len(split.hours) == 2
    rule, catch_all = cfg.rules
    assert rule.key == "filter.rule[0]" and catch_all.key == "filter.rule[1]"
    assert rule.domains == ("games.example", "=exact.example", "xn--bcher-kva.example")
    assert rule.url_prefix == ("http://example.com/Ads/", "http://x.example/")
    assert rule.methods == ("POST", "PUT")
    assert rule.mime == ("video/*", "application/x-msdownload")
    assert rule.extensions == (".exe", ".msi")
    assert rule.max_response_size == 50 * 1024 * 1024
    assert rule.response_side and not rule.sni_applicable
    assert catch_all.group == "*" and catch_all.sni_applicable and not catch_all.response_side


def test_regex_rejected_at_config_time_with_key() -> None:
    text = """
[[filter.group]]
name = "g"
cidrs = ["10.0.0.0/8"]
[[filter.rule]]
group = "g"
action = "deny"
[[filter.rule]]
group = "g"
action = "deny"
url_regex = ["ok", "(a)\\\\1", "(?=look)ahead"]
[[filter.rule]]
group = "g"
action = "deny"
url_regex = "x(?<=y)"
user_agent = "(?!z)"
"""
    errors = errors_for(text)
    assert "backreferences" in errors["filter.rule[1].url_regex[1]"]
    assert "filter.rule[1].url_regex[2]" in errors
    assert "filter.rule[1].url_regex[0]" not in errors
    assert "filter.rule[2].url_regex" in errors
    assert "filter.rule[2].user_agent" in errors


def test_errors_name_precise_keys(tmp_path: Path) -> None:
    (tmp_path / "adult").mkdir()
    text = f"""
[filter]
default = "block"
categories_dir = "{tmp_path}"
quic_reject = "maybe"
typo = 1

[[filter.group]]
name = "a"
cidrs = ["10.0.0.0/33"]
macs = ["zz:00:00:00:00:00"]

[[filter.group]]
name = "a"
cidrs = ["10.1.0.0/16"]

[[filter.group]]
name = "empty"

[[filter.window]]
name = "w"
days = ["monday", "funday"]
hours = "25:00-26:00"

[[filter.window]]
name = "w2"
hours = ["08:00-08:00", "8-9"]

[[filter.rule]]
group = "nobody"
action = "deny"
window = "never"
domains = ["bad domain.example", "a..b", "{"x" * 64}.example", "10.1"]
url_prefix = ["ftp://x/", "has space"]
categories = ["adult", "missing"]
methods = ["G E T"]
mime = ["video"]
extensions = [".e x e"]
max_response_size = "lots"
colour = "red"

[[filter.rule]]
action = "allow"

[[filter.rule]]
group = "a"
"""
    errors = errors_for(text)
    expected = [
        "filter.default",
        "filter.quic_reject",
        "filter.typo",
        "filter.group[0].cidrs[0]",
        "filter.group[0].macs[0]",
        "filter.group[1].name",
        "filter.group[2].cidrs",
        "filter.window[0].days[1]",
        "filter.window[0].hours",
        "filter.window[1].hours[0]",
        "filter.window[1].hours[1]",
        "filter.rule[0].group",
        "filter.rule[0].window",
        "filter.rule[0].domains[0]",
        "filter.rule[0].domains[1]",
        "filter.rule[0].domains[2]",
        "filter.rule[0].domains[3]",
        "filter.rule[0].url_prefix[0]",
        "filter.rule[0].url_prefix[1]",
        "filter.rule[0].methods[0]",
        "filter.rule[0].mime[0]",
        "filter.rule[0].extensions[0]",
        "filter.rule[0].max_response_size",
        "filter.rule[0].colour",
        "filter.rule[1].group",
        "filter.rule[2].action",
    ]
    for key in expected:
        assert key in errors, key
    assert set(errors) == set(expected), set(errors) - set(expected)
    assert "funday" in errors["filter.window[0].days[1]"]
    assert "whitespace" in errors["filter.rule[0].domains[0]"]
    # "monday" is accepted as mon.


def test_through_config_parse_reports_file_line_and_key() -> None:
    text = (
        '[filter]\nunknown = 1\n\n[[filter.rule]]\ngroup = "*"\naction = "deny"\n'
        'url_regex = "(a)\\\\1"\n'
    )
    with pytest.raises(config.ConfigErrors) as exc:
        config.parse(tomllib.loads(text), "/etc/tproxy.toml", text)
    lines = str(exc.value).splitlines()
    assert "/etc/tproxy.toml:7: filter.rule[0].url_regex: re2 cannot compile" in lines[0]
    assert lines[1:] == ["/etc/tproxy.toml:2: filter.unknown: unknown key"]  # once, not twice
    cfg = config.parse(tomllib.loads('[filter]\ndefault = "deny"\n'))
    assert cfg.sections["filter"].default == "deny"


def test_block_page_template(tmp_path: Path) -> None:
    good = tmp_path / "block.html"
    good.write_text("<p>$url blocked by $rule ($$5 fine)</p>")
    cfg, errors = parse(f'[filter]\nblock_page = "{good}"\n')
    # The parser only records the path; the loader reads the page.
    assert errors == [] and cfg.block_template is None
    assert load_files(cfg).block_template == good.read_text()
    bad = tmp_path / "bad.html"
    bad.write_text("<p>$nosuch and $url</p>")
    (line,) = file_errors(f'[filter]\nblock_page = "{bad}"\n')
    assert line.startswith("t.toml:2: filter.block_page: ") and "nosuch" in line
    (line,) = file_errors('\n[filter]\nblock_page = "/nonexistent/x.html"\n')
    assert line == (
        "t.toml:3: filter.block_page: cannot read /nonexistent/x.html: No such file or directory"
    )
    binary = tmp_path / "bin.html"
    binary.write_bytes(b"\xff\xfe<p>")
    (line,) = file_errors(f'[filter]\nblock_page = "{binary}"\n')
    assert line.endswith(f"{binary}: not UTF-8 text")
    big = tmp_path / "big.html"
    big.write_bytes(b"x" * (256 * 1024 + 1))
    (line,) = file_errors(f'[filter]\nblock_page = "{big}"\n')
    assert line.endswith("larger than 262144 bytes")


CATEGORY_RULES = """
[filter]
categories_dir = "{dir}"

[[filter.rule]]
group = "*"
action = "deny"
categories = ["adult", "missing"]

[[filter.rule]]
group = "*"
action = "deny"
categories = ["gone"]
"""


def test_missing_category_folders_are_named_with_file_line_and_key(tmp_path: Path) -> None:
    (tmp_path / "adult").mkdir()
    text = CATEGORY_RULES.format(dir=tmp_path)
    # Parsing does no I/O: the same text parses whatever exists on disk.
    cfg, errors = parse(text)
    assert errors == [] and cfg.used_categories == {"adult", "missing", "gone"}
    assert file_errors(text) == [
        f"t.toml:8: filter.rule[0].categories[1]: no category 'missing' in {tmp_path}",
        f"t.toml:13: filter.rule[1].categories[0]: no category 'gone' in {tmp_path}",
    ]
    (tmp_path / "missing").mkdir()
    (tmp_path / "gone").mkdir()
    assert file_errors(text) == []
    # Where a setting was written is not part of the settings: moving lines changes nothing.
    assert parse("\n\n" + text)[0] == cfg


def test_check_config_refuses_a_missing_category_folder(tmp_path: Path) -> None:
    (tmp_path / "adult").mkdir()
    conf = tmp_path / "t.toml"
    conf.write_text(CATEGORY_RULES.format(dir=tmp_path))
    argv = [sys.executable, "-m", "tproxy.cli", "check-config", str(conf)]
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 2, res
    assert f"{conf}:8: filter.rule[0].categories[1]: no category 'missing'" in res.stderr
    assert f"{conf}:13: filter.rule[1].categories[0]: no category 'gone'" in res.stderr
    (tmp_path / "missing").mkdir()
    (tmp_path / "gone").mkdir()
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 0 and res.stdout == f"{conf}: OK\n", res


def test_check_lists_refuses_a_config_the_daemon_would_refuse(tmp_path: Path) -> None:
    (tmp_path / "adult").mkdir()
    (tmp_path / "adult" / "domains").write_text("porn.example\n")
    conf = tmp_path / "t.toml"
    conf.write_text(CATEGORY_RULES.format(dir=tmp_path))
    argv = [sys.executable, "-m", "tproxy.cli", "filter", "check-lists", "--config", str(conf)]
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 2, res
    assert f"{conf}:8: filter.rule[0].categories[1]: no category 'missing'" in res.stderr
    for name in ("missing", "gone"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "domains").write_text(f"{name}.example\n")
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 0, res
    assert "adult: 1 domains, 0 urls" in res.stdout


def test_the_block_page_is_read_once_per_loaded_config(tmp_path: Path) -> None:
    # The daemon makes the rules plan (rules_extras) before start/reload; the page read for the
    # plan is the page the policy uses: the file is not opened a second time for the same load.
    import asyncio
    from types import SimpleNamespace

    from tproxy.filter.component import FilterComponent

    page = tmp_path / "block.html"
    page.write_text("<p>first $url</p>")
    text = (
        f'[filter]\nblock_page = "{page}"\n\n'
        '[[filter.rule]]\ngroup = "*"\naction = "deny"\ndomains = ["x.example"]\n'
    )
    cfg = config.parse(tomllib.loads(text))
    comp = FilterComponent(cfg)
    comp.rules_extras(cfg)
    page.unlink()  # gone after the plan was made: start must not need it again
    server = SimpleNamespace(request_hooks=[], response_hooks=[])
    daemon: Any = SimpleNamespace(
        plan=SimpleNamespace(nfqueue_num=None, https_ports=()), components=[comp], server=server
    )
    asyncio.run(comp.start(daemon))
    assert comp.policy.block_template == "<p>first $url</p>"
    # A reload parses the config anew: its page is read (once) again.
    page.write_text("<p>second $url</p>")
    new = config.parse(tomllib.loads(text))
    daemon.make_plan = lambda c: SimpleNamespace(nfqueue_num=None, https_ports=())
    comp.rules_extras(new)
    page.write_text("<p>third $url</p>")
    asyncio.run(comp.reload(daemon, new))
    assert comp.policy.block_template == "<p>second $url</p>"

"""``tproxy filter explain`` for the evasion cases of the review: what it prints must be what
the daemon decides."""

from __future__ import annotations

from pathlib import Path

import pytest

from tproxy.cli import main

CONFIG = """
[filter]
categories_dir = "{lists}"
sni_default = "deny"

[[filter.group]]
name = "pupils"
cidrs = ["192.168.10.0/24", "fd00:10::/64"]

[[filter.rule]]
group = "pupils"
action = "deny"
domains = ["blocked.example", "bücher.example", "192.0.2.66"]

[[filter.rule]]
group = "pupils"
action = "deny"
url_prefix = ["open.example/secret/"]

[[filter.rule]]
group = "pupils"
action = "deny"
categories = ["adult"]
"""


@pytest.fixture
def conf(tmp_path: Path) -> str:
    (tmp_path / "adult").mkdir()
    (tmp_path / "adult" / "domains").write_bytes(b"\xef\xbb\xbf# list\r\n*.porn.example\r\n")
    path = tmp_path / "t.toml"
    path.write_text(CONFIG.format(lists=tmp_path))
    return str(path)


@pytest.mark.parametrize(
    ("url", "client", "code", "words"),
    [
        ("http://BLOCKED.example.:80/", "192.168.10.5", 1, "domain blocked.example"),
        ("http://open.example/public/%2e%2e/secret/x", "192.168.10.5", 1, "url_prefix"),
        ("http://open.example/public/%2e%2e/secret/x", "fd00:10::7", 1, "group pupils"),
        ("http://open.example/%73ecret/x", "192.168.10.5", 1, "matched as"),
        ("http://open.example/public/x", "192.168.10.5", 0, "verdict: ALLOW"),
        ("http://www.porn.example/", "192.168.10.5", 1, "category:adult"),
        ("https://Bücher.Example./", "192.168.10.5", 1, "domain xn--bcher-kva.example"),
        ("https://www.blocked.example:443/", "fd00:10::7", 1, "verdict: DENY"),
        ("https://wiki.example/", "192.168.10.5", 0, "verdict: ALLOW"),
        ("http://blocked.example/", "192.168.20.5", 0, "group default"),
    ],
)
def test_explain_agrees_with_the_daemon(
    conf: str, capsys: pytest.CaptureFixture[str], url: str, client: str, code: int, words: str
) -> None:
    rc = main(["filter", "explain", url, "--client", client, "--config", conf, "--time", "10:00"])
    out = capsys.readouterr().out
    assert rc == code, out
    assert words in out, out
    assert "warning" not in out, out


def test_explain_without_sni_uses_sni_default(
    conf: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["filter", "explain", "x", "--sni", "", "--client", "192.168.10.5", "-c", conf])
    out = capsys.readouterr().out
    assert rc == 1 and "verdict: DENY by sni_default: no SNI in ClientHello" in out, out


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        # An allowed name at a denied address: what the daemon decides, since it forwards to
        # the address the client connected to.
        (["http://school.example/", "--dest", "192.0.2.66"], 1, "to 192.0.2.66"),
        (["http://school.example/", "--dest", "192.0.2.67"], 0, "verdict: ALLOW"),
        (["x", "--sni", "school.example", "--dest", "192.0.2.66"], 1, "at 192.0.2.66"),
        # Two readings of one path: both shown, denied if either is.
        (["http://open.example/secret/..;x/../x"], 1, "and as http://open.example/x"),
    ],
)
def test_explain_knows_the_destination_and_both_readings_of_a_path(
    conf: str, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, words: str
) -> None:
    rc = main(
        ["filter", "explain", *argv, "--client", "192.168.10.5", "-c", conf, "--time", "10:00"]
    )
    out = capsys.readouterr().out
    assert rc == code, out
    assert words in out, out

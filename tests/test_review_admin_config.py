"""An admin's mistakes in tproxy.toml, as `tproxy check-config` reports them.

Each message must name the file, the line and the dotted key, and say what is expected — the
admin fixes the file from the message alone (they came from squid.conf, not from our code).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tproxy import config as config_mod
from tproxy.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "tproxy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    return [line.replace(f"{path}:", "F:") for line in str(info.value).splitlines()]


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tproxy.cli", "check-config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A typo'd section name points at the section the admin meant.
        ("[filtr]\nenabled = true\n", "F:1: filtr: unknown section (did you mean [filter]?)"),
        ("[proxi]\n", "F:1: proxi: unknown section (did you mean [proxy]?)"),
        ("[nonsense]\n", "F:1: nonsense: unknown section"),
        # A typo'd key names the real one.
        (
            '[proxy]\nlan_interface = ["eth1"]\n',
            "F:2: proxy.lan_interface: unknown key (did you mean lan_interfaces?)",
        ),
        # Squid habit: options without a section header.
        (
            "listen_port = 3129\n",
            "F:1: listen_port: unknown key (options belong under a section header such as [proxy])",
        ),
        # tomllib reports a repeated key at the end of the document without naming it.
        (
            "[proxy]\nlisten_port = 1\n\nlisten_port = 2\n",
            "F:4: proxy.listen_port: set twice (first on line 2); keep one",
        ),
        (
            "[proxy]\nports = [80]\n[rules]\nfwmark = 1\n[proxy]\nipv6 = false\n",
            "F:5: proxy: section [proxy] appears twice; merge the two into one",
        ),
        # Negative quantities written as strings say "negative", not "not a duration".
        (
            '[proxy]\nconnect_timeout = "-5s"\n',
            "F:2: proxy.connect_timeout: must not be negative; got -5",
        ),
        (
            "[proxy]\nconnect_timeout = -5\n",
            "F:2: proxy.connect_timeout: must not be negative; got -5",
        ),
        # 0 is not "no timeout" here: it would expire every connection at once.
        (
            '[proxy]\nrequest_timeout = "0s"\n',
            "F:2: proxy.request_timeout: must be positive: 0 would time out every connection "
            "at once",
        ),
        (
            '[proxy]\nlisten_port = "3129"\n',
            "F:2: proxy.listen_port: expected an integer, got '3129'",
        ),
        (
            '[rules]\nbypass_clients = ["10.0.0.0/33"]\n',
            "F:2: rules.bypass_clients[0]: not an IP address or CIDR: '10.0.0.0/33'",
        ),
        (
            '[proxy]\nlan_interfaces = ["eth0 eth1"]\n',
            "F:2: proxy.lan_interfaces[0]: not an interface name: 'eth0 eth1'",
        ),
        (
            '[proxy]\nlan_interfaces = ["averyveryverylongname"]\n',
            "F:2: proxy.lan_interfaces[0]: not an interface name: 'averyveryverylongname'",
        ),
        (
            "[proxy\nports = [80]\n",
            "F:1: TOML syntax error: Expected ']' at the end of a table declaration in `[proxy`",
        ),
    ],
)
def test_mistake_is_named_with_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in errors_of(tmp_path, text)


def test_drain_timeout_zero_is_allowed(tmp_path: Path) -> None:
    # Stopping without waiting for transfers is a legitimate choice, unlike a zero deadline.
    path = tmp_path / "t.toml"
    path.write_text("[proxy]\ndrain_timeout = 0\n")
    assert config_mod.load(path).proxy.drain_timeout == 0


def test_all_mistakes_in_one_pass(tmp_path: Path) -> None:
    errs = errors_of(
        tmp_path, '[proxy]\nlisten_port = "x"\nkeepalive_timeout = 0\n[filtr]\n[rules]\nfw = 1\n'
    )
    assert len(errs) == 4, errs


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: d / "absent.toml", "no such file"),
        (lambda d: d, "cannot read: Is a directory"),
        (lambda d: d / "bin.toml", "not UTF-8 text"),
    ],
)
def test_check_config_exit_2_for_unreadable_files(tmp_path: Path, make: object, words: str) -> None:
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[proxy]\n")
    target = make(tmp_path)  # type: ignore[operator]
    res = check_config(str(target))
    assert res.returncode == 2
    assert res.stdout == ""
    assert f"{target}: {words}" in res.stderr


def test_check_config_exit_codes_and_streams(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[proxy]\nlan_interfaces = ["eth1"]\n')
    res = check_config(str(good))
    assert (res.returncode, res.stdout, res.stderr) == (0, f"{good}: OK\n", "")
    bad = tmp_path / "bad.toml"
    bad.write_text("[proxy]\nports = [0]\n")
    res = check_config(str(bad))
    assert res.returncode == 2
    assert f"{bad}:2: proxy.ports[0]: not a TCP port: 0" in res.stderr
    # Usage errors are argparse's exit 2 too, on stderr.
    assert check_config().returncode == 2


def test_check_config_warns_that_the_daemon_would_not_start(tmp_path: Path) -> None:
    # The file is valid (the packaged one is shipped like this), but `tproxy run` refuses it:
    # ExecStartPre passing and ExecStart failing would leave the admin guessing.
    path = tmp_path / "t.toml"
    path.write_text("[proxy]\nports = [80]\n")
    res = check_config(str(path))
    assert res.returncode == 0
    assert res.stdout == f"{path}: OK\n"
    assert "proxy.lan_interfaces is empty" in res.stderr
    assert len(res.stderr.splitlines()) == 1

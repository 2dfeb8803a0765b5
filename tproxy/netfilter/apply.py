"""Apply, remove and show tproxy's netfilter rules with iptables-restore / iptables-save.

Each family is changed by one ``iptables-restore --noflush`` run (see :func:`.render.compose`):
existing hook jumps are deleted, our chains redeclared (which flushes them) and refilled, stale
chains of ours deleted and the hooks re-inserted, all in one transaction. Running it twice gives
the same state; chains and rules that are not ours are never named, so they are never touched.

Every failure becomes one :class:`RulesError` with one line a gateway operator can act on; a
missing kernel feature is named with its Kconfig option.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence

from .render import (
    FAMILIES,
    LiveTable,
    RulesPlan,
    compose,
    parse_save,
    render_tables,
)

# iptables-restore waits this long for the xtables lock (legacy backend) before failing.
LOCK_WAIT_SECONDS = 10
COMMAND_TIMEOUT_SECONDS = 30.0

_TOOLS = {4: ("iptables-restore", "iptables-save"), 6: ("ip6tables-restore", "ip6tables-save")}

# Extensions our rules use, with a readable name and the kernel option that provides them.
FEATURES: dict[str, tuple[str, str]] = {
    "TPROXY": ("the TPROXY target", "CONFIG_NETFILTER_XT_TARGET_TPROXY"),
    "socket": ("the socket match", "CONFIG_NETFILTER_XT_MATCH_SOCKET"),
    "NFQUEUE": ("the NFQUEUE target", "CONFIG_NETFILTER_XT_TARGET_NFQUEUE"),
    "conntrack": ("the conntrack match", "CONFIG_NETFILTER_XT_MATCH_CONNTRACK"),
    "CLASSIFY": ("the CLASSIFY target", "CONFIG_NETFILTER_XT_TARGET_CLASSIFY"),
    "CONNMARK": ("the CONNMARK target", "CONFIG_NETFILTER_XT_CONNMARK"),
    "connmark": ("the connmark match", "CONFIG_NETFILTER_XT_CONNMARK"),
    "MARK": ("the MARK target", "CONFIG_NETFILTER_XT_MARK"),
    "mark": ("the mark match", "CONFIG_NETFILTER_XT_MARK"),
    "addrtype": ("the addrtype match", "CONFIG_NETFILTER_XT_MATCH_ADDRTYPE"),
    "multiport": ("the multiport match", "CONFIG_NETFILTER_XT_MATCH_MULTIPORT"),
    "REJECT": ("the REJECT target", "CONFIG_IP_NF_TARGET_REJECT / CONFIG_IP6_NF_TARGET_REJECT"),
}


class RulesError(Exception):
    """Kernel rules or routes could not be applied, removed or read; ``str`` is one line."""


def netns_argv(cmd: Sequence[str], netns: str | None) -> list[str]:
    """``cmd`` run inside network namespace ``netns`` (ip-netns(8) exec), or as is."""
    return (["ip", "netns", "exec", netns] if netns else []) + list(cmd)


def _run(cmd: Sequence[str], netns: str | None, stdin: str | None = None) -> tuple[int, str, str]:
    argv = netns_argv(cmd, netns)
    try:
        res = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT_SECONDS,
        )
    except FileNotFoundError:
        raise RulesError(
            f"{argv[0]} not found: install the iptables and iproute2 packages"
        ) from None
    except subprocess.TimeoutExpired:
        raise RulesError(
            f"{' '.join(argv)} did not finish in {COMMAND_TIMEOUT_SECONDS:g} s"
        ) from None
    return res.returncode, res.stdout, res.stderr


_LINE_NO = re.compile(r"(?:line:?\s*)(\d+)", re.I)
_EXT_WARNING = re.compile(r"Extension (\S+) revision \d+ not supported")
_CANT_LOAD = re.compile(r"Couldn't load (?:target|match) `([^']+)'")
_MISSING = ("No such file or directory", "No chain/target/match by that name")


def _extensions(line: str) -> list[str]:
    return re.findall(r"(?:^|\s)-[jm]\s+(\S+)", line)


def _kconfig(name: str) -> tuple[str, str]:
    if name in FEATURES:
        return FEATURES[name]
    # xtables convention: targets are upper case, matches lower case (xt_NAME.c / xt_name.c).
    kind = "TARGET" if name.isupper() else "MATCH"
    return f"the {name} {kind.lower()}", f"CONFIG_NETFILTER_XT_{kind}_{name.upper()}"


def explain_failure(tool: str, family: int, stdin: str, stderr: str) -> str:
    """One line from an iptables-restore failure; pure, so it is tested with real stderr."""
    text = " ".join(stderr.split())
    number = None
    for match in _LINE_NO.finditer(stderr):
        number = int(match.group(1))
    lines = stdin.splitlines()
    failed = lines[number - 1].strip() if number and 0 < number <= len(lines) else ""
    warned = _EXT_WARNING.search(stderr) or _CANT_LOAD.search(stderr)
    if warned or any(m in stderr for m in _MISSING):
        candidates = [warned.group(1)] if warned else _extensions(failed)
        names = [c for c in candidates if not c.startswith("TPROXY-")]
        if names:
            feature, option = _kconfig(names[-1])
            return f"kernel lacks {feature} ({option}) for IPv{family} rules"
    reason = re.sub(rf"^{re.escape(tool)} v[\d.]+ \([^)]*\):\s*", "", text)
    reason = re.sub(r"\s*Try `.*$", "", reason)
    where = f" at `{failed}`" if failed else ""
    return f"{tool} failed{where}: {reason or 'exit status without a message'}"


def run_restore(text: str, family: int, netns: str | None = None) -> None:
    """Feed one ``--noflush`` input to (ip6)iptables-restore; raise :class:`RulesError`."""
    tool = _TOOLS[family][0]
    code, _, err = _run([tool, "--noflush", "--wait", str(LOCK_WAIT_SECONDS)], netns, text)
    if code != 0:
        raise RulesError(explain_failure(tool, family, text, err))


def _save(family: int, netns: str | None) -> str | None:
    """``iptables-save`` output, or None when the family is unavailable (e.g. IPv6 disabled)."""
    tool = _TOOLS[family][1]
    code, out, err = _run([tool], netns)
    if code != 0:
        if family == 6:
            return None
        raise RulesError(f"{tool} failed: {' '.join(err.split()) or f'exit status {code}'}")
    return out


def _live(family: int, netns: str | None) -> tuple[LiveTable, ...]:
    saved = _save(family, netns)
    return parse_save(saved)[0] if saved else ()


def apply(plan: RulesPlan, netns: str | None = None) -> None:
    """Install ``plan`` (replacing any rules of ours), one atomic restore per family. With
    ``plan.ipv6`` off, our IPv6 rules are removed instead."""
    for family in FAMILIES:
        live = _live(family, netns)
        if family in plan.families():
            tables = render_tables(plan, family)
        elif not live:
            continue
        else:
            tables = ()
        text = compose(tables, live)
        if text:
            run_restore(text, family, netns)


def flush(netns: str | None = None) -> None:
    """Remove our hooks and chains in both families. Needs no plan, so it works after a crash
    or a config change: ours is recognised by the chain-name prefix in the live tables."""
    for family in FAMILIES:
        live = _live(family, netns)
        text = compose((), live)
        if text:
            run_restore(text, family, netns)


def show_by_family(netns: str | None = None) -> dict[int, str]:
    """Our live rules per family, as an ``iptables-save`` excerpt ("" when none)."""
    out: dict[int, str] = {}
    for family in FAMILIES:
        saved = _save(family, netns)
        out[family] = parse_save(saved)[1] if saved else ""
    return out


def show(netns: str | None = None) -> str:
    """Our live rules of both families for people: "" when nothing of ours is installed."""
    parts = [
        f"# IPv{family}: {_TOOLS[family][1]} excerpt\n{text}"
        for family, text in show_by_family(netns).items()
        if text
    ]
    return "".join(parts)

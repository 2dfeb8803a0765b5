"""The shipped conffile (/etc/tproxy/tproxy.toml) documents every option with its real default.

The list of options is not written down here: it is recorded from the parsers themselves, by
running :func:`tproxy.config.load` with a :class:`~tproxy.config.Reader` subclass that notes every
key a parser asks for. A parser can only accept a key it asks for (``Reader.finish`` rejects the
rest), so the recording is exactly the set of accepted keys, and a new option in any registered
section fails this test until the conffile shows it.

Conventions of the conffile that the checks rely on (and that its header explains to admins):

* each ``[section]`` header is present and uncommented, with no active setting below it;
* each option of a section appears exactly once as ``# key = <default>`` (one space after the
  ``#``); examples are indented further (``#     key = value``) and are not defaults;
* arrays of tables have commented example blocks that start with ``# [[section.name]]``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tproxy import config as config_mod

REPO = Path(__file__).resolve().parent.parent
CONFFILE = REPO / "packaging" / "tproxy.toml"

DEFAULT_LINE = re.compile(r"^# ([A-Za-z_][A-Za-z0-9_]*) = (.+)$")
TABLE_HEADER = re.compile(r"^\[([A-Za-z0-9_.]+)\]\s*$")
ARRAY_EXAMPLE = re.compile(r"^# (\[\[([A-Za-z0-9_.]+)\]\])\s*$")
# A path of arrays-of-tables elements, "filter.rule[3]" → "filter.rule".
_INDEX = re.compile(r"\[\d+\]")


# -- what the parsers accept --------------------------------------------------------------------


@dataclass
class Accepted:
    """Keys the parsers ask for, per table path ("" is the root, "filter.rule" an array)."""

    keys: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    arrays: set[str] = field(default_factory=set)

    @property
    def sections(self) -> set[str]:
        return set(self.keys[""])

    def options(self, path: str) -> set[str]:
        """The keys of a table that are settings (not nested tables or arrays of tables)."""
        return {k for k in self.keys[path] if f"{path}.{k}" not in self.arrays}


def record_accepted_keys(monkeypatch: pytest.MonkeyPatch) -> Accepted:
    """Run the real loader on an empty document with a recording Reader.

    Each array of tables is given one empty element, so the element parser runs and asks for
    its keys too (it reports errors for the missing required ones; those are expected here).
    ``has`` is recorded as well: optional keys without a default (``ceil``, ``user_agent``) are
    only asked for with ``r.has(key)`` when absent.
    """
    accepted = Accepted()
    original = config_mod.Reader

    class Recording(original):  # type: ignore[valid-type,misc]
        def _path(self) -> str:
            return _INDEX.sub("", self.prefix)

        def _get(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
            accepted.keys[self._path()].add(key)
            return super()._get(key, default, kinds, what)

        def has(self, key: str) -> bool:
            accepted.keys[self._path()].add(key)
            return bool(super().has(key))

        def tables(self, key: str) -> list[config_mod.Reader]:
            super().tables(key)  # records the key and checks the type as the parser would
            accepted.arrays.add(f"{self._path()}.{key}" if self._path() else key)
            return [Recording({}, self.path, f"{self.dotted(key)}[0]", self.lines, self.errors)]

    # ``config.parse`` builds its root Reader (and ``Reader.table`` its children) by the module
    # global name, so patching it makes every reader of one load() a recording one.
    monkeypatch.setattr(config_mod, "Reader", Recording)
    try:
        config_mod.load(None)
    except config_mod.ConfigError:
        pass  # the empty array elements lack their required keys
    finally:
        monkeypatch.setattr(config_mod, "Reader", original)
    return accepted


@pytest.fixture(scope="module")
def accepted() -> Iterator[Accepted]:
    with pytest.MonkeyPatch.context() as mp:
        yield record_accepted_keys(mp)


# -- what the conffile documents ----------------------------------------------------------------


@dataclass
class Documented:
    # section -> key -> (line number, value text) of its "# key = default" line
    defaults: dict[str, dict[str, tuple[int, str]]] = field(default_factory=dict)
    # array path -> keys shown in its commented example blocks
    examples: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    active_lines: list[tuple[int, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


def scan(text: str) -> Documented:
    doc = Documented()
    section = ""
    array: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        header = TABLE_HEADER.match(line)
        if header:
            section, array = header.group(1), None
            doc.defaults.setdefault(section, {})
            continue
        example = ARRAY_EXAMPLE.match(line)
        if example:
            array = example.group(2)
            continue
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            doc.active_lines.append((number, line))
            continue
        setting = DEFAULT_LINE.match(line)
        if not setting:
            continue
        key, value = setting.group(1), setting.group(2)
        if array is not None:
            doc.examples[array].add(key)
        elif key in doc.defaults.get(section, {}):
            doc.duplicates.append(f"line {number}: {section}.{key} shown twice as a default")
        else:
            doc.defaults.setdefault(section, {})[key] = (number, value)
    return doc


def uncomment(text: str, examples: bool) -> str:
    """Switch on every ``# key = default`` line (and, with ``examples``, the example blocks)."""
    out: list[str] = []
    array: str | None = None
    for line in text.splitlines():
        if TABLE_HEADER.match(line):
            array = None
        example = ARRAY_EXAMPLE.match(line)
        if example:
            array = example.group(2)
            out.append(example.group(1) if examples else line)
            continue
        setting = DEFAULT_LINE.match(line)
        if setting and (array is None or examples):
            out.append(line[2:])
        else:
            out.append(line)
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def text() -> str:
    return CONFFILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def documented(text: str) -> Documented:
    return scan(text)


def _defaults() -> config_mod.Config:
    return config_mod.load(None)


def _settings(cfg: config_mod.Config) -> tuple[Any, ...]:
    """Everything but the file name."""
    return (cfg.proxy, cfg.rules, cfg.log, dict(cfg.sections))


def _same_settings(a: config_mod.Config, b: config_mod.Config) -> bool:
    return _settings(a) == _settings(b)


# -- the checks ---------------------------------------------------------------------------------


def test_recorder_sees_every_registered_section(accepted: Accepted) -> None:
    """The recording covers the foundation and every registered feature section (a recorder
    that saw nothing would make the other checks pass vacuously)."""
    expected = {"proxy", "rules", "log", *config_mod.SECTION_PARSERS}
    assert accepted.sections == expected
    for name in expected:
        assert accepted.options(name), f"no option recorded for [{name}]"
    assert {"filter.group", "filter.window", "filter.rule"} <= accepted.arrays
    assert {"shaping.class", "shaping.select"} <= accepted.arrays
    assert {"ceil", "per_connection_cap"} <= accepted.keys["shaping.class"]  # has()-only keys


def test_conffile_documents_every_option_with_its_default(
    accepted: Accepted, documented: Documented
) -> None:
    """Every key every parser accepts is shown — no more, no fewer, and each once."""
    assert not documented.duplicates, documented.duplicates
    assert set(documented.defaults) == accepted.sections, "a [section] header is missing or extra"
    assert "" not in documented.defaults
    for section in sorted(accepted.sections):
        shown = set(documented.defaults[section])
        wanted = accepted.options(section)
        assert wanted - shown == set(), f"[{section}] does not show {sorted(wanted - shown)}"
        assert shown - wanted == set(), f"[{section}] shows unknown {sorted(shown - wanted)}"
    assert set(documented.examples) == accepted.arrays, "an array of tables has no example"
    for array in sorted(accepted.arrays):
        shown, wanted = documented.examples[array], accepted.keys[array]
        assert wanted - shown == set(), f"[[{array}]] examples lack {sorted(wanted - shown)}"
        assert shown - wanted == set(), (
            f"[[{array}]] examples show unknown {sorted(shown - wanted)}"
        )


def test_readme_names_every_key(accepted: Accepted) -> None:
    """The README is the admin's manual: every key a parser accepts is named in it (the
    conffile, checked above, gives each its default and an example)."""
    readme = (REPO / "README.md").read_text()
    missing = [
        f"{path}.{key}" if path else key
        for path, keys in sorted(accepted.keys.items())
        for key in sorted(keys)
        if not re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", readme)
    ]
    assert missing == []


def test_each_commented_default_is_the_real_default(documented: Documented) -> None:
    """``# key = value`` parsed on its own gives exactly the dataclass default (checked one key
    at a time, so a wrong value names its line)."""
    defaults = _defaults()
    for section, keys in documented.defaults.items():
        for key, (number, value) in keys.items():
            data = tomllib.loads(f"[{section}]\n{key} = {value}\n")
            try:
                cfg = config_mod.parse(data, "line")
            except config_mod.ConfigError as exc:
                pytest.fail(f"line {number}: {section}.{key} = {value}: {exc}")
            assert _same_settings(cfg, defaults), (
                f"line {number}: {section}.{key} = {value} is not the default"
            )


def test_conffile_as_shipped_is_the_defaults(text: str, documented: Documented) -> None:
    assert documented.active_lines == [], "the shipped file must not change any default"
    cfg = config_mod.load(CONFFILE)
    assert _same_settings(cfg, _defaults())
    assert cfg.proxy.lan_interfaces == ()


def test_uncommenting_every_default_changes_nothing(text: str) -> None:
    data = tomllib.loads(uncomment(text, examples=False))
    cfg = config_mod.parse(data, "uncommented")
    assert _same_settings(cfg, _defaults())


def test_examples_form_a_valid_config(text: str, tmp_path: Path) -> None:
    """The example blocks, switched on together, are a config tproxy accepts (the category
    directories they name are created in a scratch categories_dir)."""
    data = tomllib.loads(uncomment(text, examples=True))
    for rule in data["filter"]["rule"]:
        for name in rule.get("categories", []):
            (tmp_path / name).mkdir(exist_ok=True)
    data["filter"]["categories_dir"] = str(tmp_path)
    cfg = config_mod.parse(data, "examples")
    filt, shaping = cfg.sections["filter"], cfg.sections["shaping"]
    assert filt.groups and filt.windows and filt.rules
    assert shaping.classes and shaping.selectors
    # Every group/window/class an example refers to is defined by another example.
    groups = {g.name for g in filt.groups}
    assert {s.group for s in shaping.selectors if s.group} <= groups
    windows = {w.name for w in filt.windows}
    assert {s.window for s in shaping.selectors if s.window} <= windows


def _tproxy_command() -> list[str]:
    script = Path(sys.executable).parent / "tproxy"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "tproxy.cli"]


def test_check_config_accepts_the_conffile() -> None:
    result = subprocess.run(
        [*_tproxy_command(), "check-config", str(CONFFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{CONFFILE}: OK"


def test_packaged_default_refuses_to_start_without_lan_interfaces() -> None:
    # Guard: only ever ask `run` to start from a file that cannot start it.
    assert config_mod.load(CONFFILE).proxy.lan_interfaces == ()
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "INVOCATION_ID")}
    result = subprocess.run(
        [*_tproxy_command(), "run", "--config", str(CONFFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 2
    assert "proxy.lan_interfaces" in result.stderr


def test_header_tells_how_to_check_and_apply(text: str) -> None:
    header = text[: text.index("\n[")]
    for needed in (
        "tproxy check-config /etc/tproxy/tproxy.toml",
        "systemctl reload tproxy",
        "systemctl restart tproxy",
        "lan_interfaces",
        "journalctl -u tproxy",
    ):
        assert needed in header, f"header does not mention {needed!r}"

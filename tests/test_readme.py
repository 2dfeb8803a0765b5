"""Every config example in the README is a valid config (an admin will paste them)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from tproxy import config

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
CATEGORIES_DIR = "/var/lib/tproxy/blacklists"


def test_readme_has_config_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_config_example_is_valid(index: int, tmp_path: Path) -> None:
    text = BLOCKS[index]
    # Category names the example uses must exist as list folders (UT1 layout).
    for name in re.findall(r"categories = \[([^\]]*)\]", text):
        for cat in re.findall(r'"([^"]+)"', name):
            (tmp_path / cat).mkdir(exist_ok=True)
            (tmp_path / cat / "domains").write_text("example.invalid\n")
    text = text.replace(CATEGORIES_DIR, str(tmp_path))
    config._register_builtin_sections()
    config.parse(tomllib.loads(text), f"README block {index}", text)

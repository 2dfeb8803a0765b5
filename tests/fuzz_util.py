"""The seed corpus of a fuzz target, replayed as pytest cases (shared by the fuzz tests)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest


def corpus_files(corpus: Path) -> list[Path]:
    return sorted(p for p in corpus.iterdir() if p.is_file()) if corpus.is_dir() else []


def corpus_params(corpus: Path, known: Mapping[str, str], violation: type[BaseException]) -> Any:
    """One case per corpus file; files of known, unfixed findings are strict xfails."""
    return [
        pytest.param(
            p, marks=pytest.mark.xfail(raises=violation, strict=True, reason=known[p.name])
        )
        if p.name in known
        else p
        for p in corpus_files(corpus)
    ]

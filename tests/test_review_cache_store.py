"""Adversarial review of tproxy.cache.store: many variants, unusable directories, a full disk."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tproxy.cache.policy import CacheEntry, make_entry
from tproxy.cache.store import (
    MAX_VARIANTS,
    CacheDirError,
    CacheStore,
    KiB,
    MiB,
    object_id,
)

NOW = 1_700_000_000.0
URL = "http://example.com/v"


def variant(ua: bytes, t: float = NOW) -> CacheEntry:
    return make_entry(
        method=b"GET",
        key=URL,
        url=URL,
        status=200,
        request_headers=[(b"User-Agent", ua)],
        response_headers=[(b"Cache-Control", b"max-age=60"), (b"Vary", b"User-Agent")],
        request_time=t,
        response_time=t,
    )


def put(store: CacheStore, entry: CacheEntry, body: bytes) -> bool:
    w = store.begin(entry)
    w.write(body)
    return w.commit()


def open_store(d: Path, **kw: int) -> CacheStore:
    args = {"memory_size": 1 * MiB, "disk_size": 8 * MiB, "max_memory_object_size": 0}
    args.update(kw)
    return CacheStore(disk_dir=d, **args)  # type: ignore[arg-type]


def test_a_lookup_reads_only_the_metadata_of_the_variant_it_can_select(tmp_path: Path) -> None:
    """With a cold entry cache, select() read the .meta of *every* variant of the key under
    the store lock (O(variants) disk reads per lookup). The Vary selection is part of the
    object id, so only a variant that can match needs its metadata. Observable: the metadata
    of the other variants may be gone without select() noticing (and dropping them)."""
    d = tmp_path / "c"
    store = open_store(d)
    for i in range(20):
        assert put(store, variant(b"ua-%d" % i), b"body %d" % i)
    store = open_store(d)  # cold: nothing loaded
    wanted = object_id(variant(b"ua-7"))
    for i in range(20):
        oid = object_id(variant(b"ua-%d" % i))
        if oid != wanted:
            assert store.disk is not None
            store.disk.meta_path(oid).unlink()
    found = store.select(URL, [(b"User-Agent", b"ua-7")])
    assert found is not None and object_id(found) == wanted
    assert store.stats().disk_objects == 20
    # A request for an unknown variant reads nothing either, and finds nothing.
    assert store.select(URL, [(b"User-Agent", b"other")]) is None
    assert store.stats().disk_objects == 20


def test_variants_per_key_are_bounded(tmp_path: Path) -> None:
    """Vary: User-Agent can make a variant per client; one URL must not fill the index."""
    for d in (tmp_path / "disk", None):
        store = open_store(d) if d is not None else CacheStore(memory_size=4 * MiB)
        for i in range(MAX_VARIANTS + 25):
            assert put(store, variant(b"ua-%d" % i, NOW + i), b"x")
        assert len(store.variants(URL)) == MAX_VARIANTS
        # The newest ones are kept.
        assert store.select(URL, [(b"User-Agent", b"ua-%d" % (MAX_VARIANTS + 24))]) is not None
        assert store.select(URL, [(b"User-Agent", b"ua-0")]) is None


def test_an_unusable_disk_dir_is_one_clear_error_naming_it(tmp_path: Path) -> None:
    afile = tmp_path / "plain-file"
    afile.write_text("x")
    with pytest.raises(CacheDirError) as err:
        open_store(afile / "cache")
    assert str(afile / "cache") in str(err.value) and "cache" in str(err.value)
    assert isinstance(err.value, OSError)  # the CLI's one-line OSError report applies


# -- a full disk (a small tmpfs: needs root) ------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(base: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = base / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


@pytest.mark.lab
def test_a_full_disk_stores_nothing_half_and_the_store_keeps_serving(tmp_path: Path) -> None:
    """ENOSPC while a body or its metadata is written: write/commit report "not stored"
    (they raised OSError into the HTTP path before), no temporary file is left, and what
    was stored before is still served."""
    with small_tmpfs(tmp_path, "256k") as mnt:
        store = open_store(mnt / "c", disk_size=64 * MiB, max_object_size=16 * MiB)
        small = variant(b"small")
        assert put(store, small, b"s" * 1000)
        big = variant(b"big")
        w = store.begin(big)
        ok = True
        for _ in range(64):  # 4 MiB into 256 KiB
            ok = w.write(b"b" * (64 * KiB)) and ok
        assert ok is False or w.commit() is False
        assert not w.commit()
        assert not list((mnt / "c" / "tmp").iterdir())
        assert store.select(URL, [(b"User-Agent", b"big")]) is None
        obj = store.get(URL, [(b"User-Agent", b"small")])
        assert obj is not None
        with obj:
            assert obj.body() == b"s" * 1000
        # Fill the disk to the last byte, then try to store a tiny object: its metadata
        # cannot be written either.
        with contextlib.suppress(OSError), open(mnt / "filler", "wb") as f:
            while True:
                f.write(b"f" * 4096)
                f.flush()
        tiny = variant(b"tiny")
        w = store.begin(tiny)
        w.write(b"t")
        assert not w.commit()
        assert store.select(URL, [(b"User-Agent", b"tiny")]) is None
        assert not store.update_entry(small) or store.select(URL, [(b"User-Agent", b"small")])
        (mnt / "filler").unlink()
        assert put(store, tiny, b"t")  # space again: storing works again

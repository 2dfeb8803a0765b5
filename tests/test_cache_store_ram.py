"""tproxy.cache.store: RAM of the index per object, the store's own estimate of it, and the
index's answers when entries live on disk only (lookups read the metadata files)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tproxy.cache.policy import CacheEntry, make_entry
from tproxy.cache.store import LOADED_ENTRIES_SIZE, CacheStore, GiB, KiB, MiB, object_id

NOW = 1_700_000_000.0
# Objects in the measurement: enough that dict growth steps average out (the per-object
# figure moves by a few percent between 5k and 50k), few enough to build in seconds.
OBJECTS = 10_000
# What one disk object may cost in the index. Measured: ~4.2 KB before the compact index
# (full entries in RAM), ~250 bytes after, for the shape below.
MAX_INDEX_BYTES_PER_OBJECT = 512
# How far the store's own estimate may be from what tracemalloc sees.
ESTIMATE_TOLERANCE = 0.25


def realistic(i: int) -> CacheEntry:
    """A typical static object: 8 stored header fields (Connection is dropped); every tenth
    varies on Accept-Encoding, every twentieth is keyed by destination (Host unverified)."""
    url = f"http://cdn{i % 40}.example.com/assets/{i * 2654435761 % 2**32:08x}/img_{i}.jpg"
    key = url + " @192.0.2.7:80" if i % 20 == 7 else url
    headers = [
        (b"Date", b"Tue, 14 Nov 2023 22:13:20 GMT"),
        (b"Server", b"nginx/1.22.1"),
        (b"Content-Type", b"image/jpeg"),
        (b"Content-Length", b"10"),
        (b"Last-Modified", b"Mon, 02 Oct 2023 10:%02d:00 GMT" % (i % 60)),
        (b"Connection", b"keep-alive"),
        (b"ETag", b'"%x-%x"' % (0x65000000 + i, 1000 + i % 5000)),
        (b"Cache-Control", b"public, max-age=86400"),
        (b"Accept-Ranges", b"bytes"),
    ]
    req: list[tuple[bytes, bytes]] = []
    if i % 10 == 0:
        headers.append((b"Vary", b"Accept-Encoding"))
        req = [(b"Accept-Encoding", b"gzip, deflate, br")]
    return make_entry(
        method=b"GET",
        key=key,
        url=url,
        status=200,
        request_headers=req,
        # Own bytes objects, as a parser delivers them (literals would be shared).
        response_headers=[(bytes(bytearray(n)), bytes(bytearray(v))) for n, v in headers],
        request_time=NOW + i * 0.01,
        response_time=NOW + i * 0.01 + 0.02,
        reason=b"OK",
    )


def put(store: CacheStore, entry: CacheEntry, body: bytes) -> None:
    w = store.begin(entry)
    w.write(body)
    assert w.commit()


def disk_store(d: Path) -> CacheStore:
    # memory_size 1 byte: nothing is kept in the memory tier, so the disk index stands alone.
    return CacheStore(memory_size=1, disk_dir=d, disk_size=1 * GiB, max_memory_object_size=1)


@contextmanager
def traced() -> Iterator[list[int]]:
    """Bytes allocated and still alive across the block (after a collection)."""
    out: list[int] = []
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        yield out
        gc.collect()
        out.append(tracemalloc.get_traced_memory()[0] - before)
    finally:
        tracemalloc.stop()


def test_disk_index_ram_per_object_after_restart(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    store = disk_store(d)
    for i in range(OBJECTS):
        put(store, realistic(i), b"0123456789")
    del store
    with traced() as used:
        again = disk_store(d)
    measured = used[0] / OBJECTS
    st_ = again.stats()
    print(f"index: {measured:.0f} B/object measured, {st_.index_bytes_per_object} estimated")
    assert st_.disk_objects == OBJECTS
    assert measured < MAX_INDEX_BYTES_PER_OBJECT
    assert abs(st_.index_bytes_per_object - measured) <= ESTIMATE_TOLERANCE * measured
    # The compact index still answers everything: entries (read back from disk), Vary
    # selection, destination-keyed copies under their URL.
    for i in (0, 1, 7, 10, OBJECTS - 1):
        e = realistic(i)
        req = [(b"Accept-Encoding", b"gzip, deflate, br")] if i % 10 == 0 else []
        got = again.select(e.key, req)
        assert got is not None and got.headers == e.headers and got.url == e.url
        assert got.response_time == e.response_time and got.body_length == 10
        with again.get(e.key, req) as obj:  # type: ignore[union-attr]
            assert obj.body() == b"0123456789"
    assert again.select(realistic(10).key, [(b"Accept-Encoding", b"identity")]) is None
    assert again.object_ids_for_url(realistic(7).url) == [object_id(realistic(7))]
    assert again.purge_url(realistic(10).url) == 1


def test_memory_tier_estimate_is_honest() -> None:
    """Without a disk tier every entry lives in memory: the estimate covers them too."""
    n = 2000
    with traced() as used:
        store = CacheStore(memory_size=64 * MiB, max_memory_object_size=1 * KiB)
        for i in range(n):
            put(store, realistic(i), b"0123456789")
    measured = used[0] / n
    est = store.stats().index_bytes_per_object
    print(f"memory tier: {measured:.0f} B/object measured, {est} estimated")
    assert store.stats().memory_objects == n
    assert abs(est - measured) <= ESTIMATE_TOLERANCE * measured


def test_entries_read_from_disk_are_bounded_and_accounted(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    store = disk_store(d)
    n = 3000  # ~3.3 KB entries: about twice what the loaded-entry budget holds
    for i in range(n):
        put(store, realistic(i), b"0123456789")
    again = disk_store(d)
    base = again.stats().index_bytes
    gz = [(b"Accept-Encoding", b"gzip, deflate, br")]
    with traced() as used:
        for i in range(n):
            assert again.select(realistic(i).key, gz) is not None
    grown = again.stats().index_bytes - base
    print(f"loaded entries: {used[0]} B measured, {grown} B estimated")
    assert 0 < grown <= LOADED_ENTRIES_SIZE * 1.2  # bounded...
    assert abs(grown - used[0]) <= ESTIMATE_TOLERANCE * used[0]  # ...and shown honestly


def test_lost_metadata_drops_the_object_on_lookup(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    store = disk_store(d)
    a, b = realistic(1), realistic(2)
    put(store, a, b"aaaa")
    put(store, b, b"bbbb")
    again = disk_store(d)
    assert again.disk is not None
    body_a = again.disk.body_file(object_id(a))
    assert body_a is not None and body_a.exists()
    again.disk.meta_path(object_id(a)).unlink()  # e.g. removed by an operator
    again.disk.meta_path(object_id(b)).write_bytes(b"TPXC2 garbage\n{}")
    assert again.select(a.key, []) is None and again.select(b.key, []) is None
    assert not body_a.exists()
    st_ = again.stats()
    assert st_.disk_objects == 0 and st_.disk_bytes == 0
    assert again.object_ids_for_url(a.url) == []


def test_restart_rebuilds_the_secondary_indexes(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    store = disk_store(d)
    url = "http://example.com/x"
    gz, br = [(b"Accept-Encoding", b"gzip")], [(b"Accept-Encoding", b"br")]

    def mk(key: str, req: list[tuple[bytes, bytes]], vary: bool) -> CacheEntry:
        headers = [(b"Cache-Control", b"max-age=60")] + ([(b"Vary", b"Accept-Encoding")] * vary)
        return make_entry(method=b"GET", key=key, url=url, status=200, request_headers=req,
                          response_headers=headers, request_time=NOW, response_time=NOW)  # fmt: skip

    entries = [mk(url, gz, True), mk(url, br, True), mk(url + " @10.0.0.9:80", [], False)]
    for e in entries:
        put(store, e, b"x")
    expected = sorted(object_id(e) for e in entries)
    assert store.object_ids_for_url(url) == expected
    again = disk_store(d)
    assert again.object_ids_for_url(url) == expected
    assert len(again.variants(url)) == 2 and len(again.variants(url + " @10.0.0.9:80")) == 1
    assert again.delete(url) == 2
    assert again.object_ids_for_url(url) == [object_id(entries[2])]
    assert again.purge_url(url) == 1 and again.stats().disk_objects == 0


# -- the index against a model ---------------------------------------------------------------

URLS = ["http://h/a", "http://h/b"]
ACCEPT = [b"gzip", b"br"]
# (operation, URL index, variant, time, keyed by destination); unused fields are ignored.
Op = tuple[str, int, int, int, bool]
op: st.SearchStrategy[Op] = st.tuples(
    st.sampled_from(["put", "put", "update", "purge", "delete", "restart"]),
    st.integers(0, 1),
    st.integers(0, 2),
    st.integers(0, 2),
    st.booleans(),
)


def _model_entry(u: int, variant: int, t: int, dest: bool) -> CacheEntry:
    """variant 0: no Vary; 1, 2: Vary on Accept-Encoding with gzip or br."""
    url = URLS[u]
    key = url + " @10.0.0.1:80" if dest else url
    headers = [(b"Cache-Control", b"max-age=60"), (b"X-T", b"%d" % t)]
    req: list[tuple[bytes, bytes]] = []
    if variant:
        headers.append((b"Vary", b"Accept-Encoding"))
        req = [(b"Accept-Encoding", ACCEPT[variant - 1])]
    return make_entry(method=b"GET", key=key, url=url, status=200, request_headers=req,
                      response_headers=headers, request_time=NOW + t, response_time=NOW + t)  # fmt: skip


def _model_store(d: Path) -> CacheStore:
    # Memory holds one small object at a time: lookups meet both tiers.
    return CacheStore(
        memory_size=4 * KiB, max_memory_object_size=2 * KiB, disk_dir=d, disk_size=64 * MiB
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(op, max_size=14))
def test_index_agrees_with_a_model(tmp_path_factory: pytest.TempPathFactory, ops: list[Op]) -> None:
    """Puts, 304 updates, deletes, purges and restarts: ids by key and by URL, and the
    entries read back, always match a plain dict of what was stored."""
    d = tmp_path_factory.mktemp("model")
    store = _model_store(d)
    model: dict[str, CacheEntry] = {}
    for kind, u, variant, t, dest in ops:
        url = URLS[u]
        key = url + " @10.0.0.1:80" if dest else url
        if kind == "put":
            e = _model_entry(u, variant, t, dest)
            put(store, e, b"b" * (3000 if t == 2 else 100))  # t 2: too big for memory
            model[object_id(e)] = e
        elif kind == "update":
            e = _model_entry(u, variant, t + 10, dest)
            found = store.update_entry(e)
            assert found == (object_id(e) in model)
            if found:
                model[object_id(e)] = e
        elif kind == "purge":
            gone = [oid for oid, e in model.items() if e.url == url]
            assert store.purge_url(url) == len(gone)
            for oid in gone:
                del model[oid]
        elif kind == "delete":
            gone = [oid for oid, e in model.items() if e.key == key]
            assert store.delete(key) == len(gone)
            for oid in gone:
                del model[oid]
        else:
            store = _model_store(d)
        for url in URLS:
            want = sorted(oid for oid, e in model.items() if e.url == url)
            assert store.object_ids_for_url(url) == want
            for key in (url, url + " @10.0.0.1:80"):
                got = {object_id(e): (e.headers, e.response_time) for e in store.variants(key)}
                assert got == {
                    oid: (e.headers, e.response_time) for oid, e in model.items() if e.key == key
                }
    assert store.stats().disk_objects == len(model)

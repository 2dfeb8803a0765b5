"""tproxy.cache.store: memory and disk tiers, crash safety, purge, config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tproxy.cache.policy import CacheEntry, make_entry
from tproxy.cache.store import (
    CacheConfig,
    CacheStore,
    CorruptObjectError,
    KiB,
    MiB,
    object_id,
)
from tproxy.config import ConfigErrors, parse

NOW = 1_700_000_000.0
URL = "http://example.com/obj"


def mk(
    url: str = URL,
    key: str | None = None,
    *,
    vary: bytes | None = None,
    req: list[tuple[bytes, bytes]] | None = None,
    length: int | None = None,
    t: float = NOW,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> CacheEntry:
    headers = [(b"Cache-Control", b"max-age=60"), (b"ETag", b'"v"')] + (extra or [])
    if vary is not None:
        headers.append((b"Vary", vary))
    return make_entry(
        method=b"GET",
        key=key or url,
        url=url,
        status=200,
        request_headers=req or [],
        response_headers=headers,
        request_time=t,
        response_time=t,
        body_length=length,
    )


def put(store: CacheStore, entry: CacheEntry, body: bytes, chunk: int = 7000) -> bool:
    w = store.begin(entry)
    for i in range(0, len(body), chunk):
        if not w.write(body[i : i + chunk]):
            return False
    return w.commit()


def body_of(store: CacheStore, key: str, req: list[tuple[bytes, bytes]] | None = None) -> bytes:
    obj = store.get(key, req or [])
    assert obj is not None
    with obj:
        return obj.body()


def files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.rglob(pattern))


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def disk_store(d: Path, **kw: int | bool) -> CacheStore:
    args: dict[str, int | bool] = {
        "memory_size": 1 * MiB,
        "disk_size": 8 * MiB,
        "max_memory_object_size": 16 * KiB,
        "max_object_size": 4 * MiB,
    }
    args.update(kw)
    return CacheStore(disk_dir=d, **args)  # type: ignore[arg-type]


def test_memory_round_trip() -> None:
    store = CacheStore(memory_size=1 * MiB)
    body = os.urandom(10_000)
    assert put(store, mk(length=len(body)), body)
    obj = store.get(URL, [])
    assert obj is not None and obj.tier == "memory"
    assert obj.body() == body
    assert b"".join(obj.iter_chunks(999)) == body
    assert b"".join(obj.iter_range(10, 19)) == body[10:20]
    assert obj.entry.body_length == len(body)
    assert store.get("http://example.com/other", []) is None


def test_disk_round_trip_and_promotion(disk: Path) -> None:
    store = disk_store(disk)
    small, big = os.urandom(5000), os.urandom(300_000)
    assert put(store, mk("http://a/small"), small)
    assert put(store, mk("http://a/big"), big)
    with store.get("http://a/big", []) as obj:  # type: ignore[union-attr]
        assert obj.tier == "disk"
        assert b"".join(obj.iter_chunks()) == big
        assert b"".join(obj.iter_range(1000, 70_000)) == big[1000:70_001]
    assert body_of(store, "http://a/small") == small
    s = store.stats()
    assert s.disk_objects == 2 and s.memory_objects == 1  # only the small one in memory
    assert s.disk_bytes >= len(small) + len(big)
    assert s.index_bytes_per_object > 0 and s.index_bytes >= 2 * s.index_bytes_per_object - 1


def test_small_disk_object_promoted_after_restart(disk: Path) -> None:
    put(disk_store(disk), mk(), b"hello")
    store = disk_store(disk)
    assert store.stats().memory_objects == 0
    with store.get(URL, []) as obj:  # type: ignore[union-attr]
        assert obj.tier == "memory" and obj.body() == b"hello"
    assert store.stats().memory_objects == 1


def test_incomplete_body_is_not_stored(disk: Path) -> None:
    store = disk_store(disk)
    assert not put(store, mk(length=100), b"x" * 99)  # Content-Length said 100
    w = store.begin(mk())
    w.write(b"abc")
    assert not w.commit(expected_length=4)
    assert store.get(URL, []) is None
    assert files(disk / "tmp", "*") == []


def test_too_large_objects_are_refused(disk: Path) -> None:
    store = disk_store(disk, max_object_size=50_000)
    assert not put(store, mk(), b"x" * 50_001)
    assert store.get(URL, []) is None
    assert files(disk, "*.tmp") == []
    w = store.begin(mk(length=60_000))  # known in advance: refused at once
    assert not w.active and not w.write(b"x")
    mem = CacheStore(memory_size=1 * MiB, max_memory_object_size=1000)
    assert not put(mem, mk(), b"x" * 1001)
    assert put(mem, mk(), b"x" * 1000)


def test_writer_context_manager_aborts(disk: Path) -> None:
    store = disk_store(disk)
    with store.begin(mk()) as w:
        w.write(b"partial")
    assert store.get(URL, []) is None
    assert files(disk / "tmp", "*") == []


def test_memory_eviction_stays_within_budget() -> None:
    store = CacheStore(memory_size=64 * KiB, max_memory_object_size=16 * KiB)
    for i in range(30):
        assert put(store, mk(f"http://a/{i}"), bytes([i]) * 10_000)
        if i == 3:
            store.get("http://a/0", [])  # touch: most recently used now
        if i > 3:
            store.get("http://a/0", [])
    s = store.stats()
    assert s.memory_bytes <= 64 * KiB
    assert 3 <= s.memory_objects <= 6
    assert body_of(store, "http://a/29") == bytes([29]) * 10_000
    assert body_of(store, "http://a/0") == bytes([0]) * 10_000  # LRU kept it
    assert store.get("http://a/1", []) is None
    assert store.variants("http://a/1") == []  # secondary index follows evictions
    assert store.object_ids_for_url("http://a/1") == []


def test_disk_eviction_stays_within_budget(disk: Path) -> None:
    store = disk_store(disk, disk_size=100 * KiB, max_object_size=40 * KiB)
    for i in range(10):
        assert put(store, mk(f"http://a/{i}"), bytes([i]) * 30_000)
    s = store.stats()
    assert s.disk_bytes <= 100 * KiB and s.disk_objects == 3
    assert len(files(disk / "objects", "*.body")) == 3
    assert len(files(disk / "objects", "*.meta")) == 3
    assert store.get("http://a/0", []) is None
    assert body_of(store, "http://a/9") == bytes([9]) * 30_000
    # A restart with a smaller budget trims to it.
    small = disk_store(disk, disk_size=70 * KiB, max_object_size=40 * KiB)
    assert small.stats().disk_objects == 2
    assert small.get("http://a/7", []) is None
    assert small.get("http://a/9", []) is not None


def test_restart_keeps_objects_and_entries(disk: Path) -> None:
    store = disk_store(disk)
    e = mk(vary=b"Accept-Encoding", req=[(b"Accept-Encoding", b"gzip")], t=NOW - 5)
    big = os.urandom(100_000)
    assert put(store, e, big)
    assert put(store, mk("http://a/2"), b"two")
    again = disk_store(disk)
    stored = again.variants(URL)
    assert stored == [again.variants(URL)[0]] and stored[0].headers == e.headers
    assert stored[0].vary_key == e.vary_key and stored[0].response_time == NOW - 5
    assert stored[0].body_length == len(big)
    assert again.get(URL, [(b"Accept-Encoding", b"br")]) is None
    assert body_of(again, URL, [(b"accept-encoding", b"gzip")]) == big
    assert body_of(again, "http://a/2") == b"two"


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from tproxy.cache.policy import make_entry
    from tproxy.cache.store import CacheStore
    store = CacheStore(memory_size=1 << 20, disk_dir=sys.argv[1], disk_size=8 << 20)
    e = make_entry(method=b"GET", key=sys.argv[2], url=sys.argv[2], status=200,
                   request_headers=[], response_headers=[(b"ETag", b'"new"')],
                   request_time=1.0, response_time=1.0, body_length=200000)
    w = store.begin(e)
    w.write(b"N" * 100000)
    w._file.flush()  # the partial body is really on disk when the process dies
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_kill_9_mid_write_never_yields_a_truncated_object(disk: Path) -> None:
    store = disk_store(disk)
    assert put(store, mk(), b"O" * 1000)  # the old version being replaced
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(disk), URL],
        cwd=Path(__file__).resolve().parent.parent,
        timeout=30,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    assert len(files(disk / "tmp", "*.tmp")) == 1  # the crash left a partial temp file
    again = disk_store(disk)
    assert files(disk / "tmp", "*") == []
    assert body_of(again, URL) == b"O" * 1000  # the old object, intact


def test_orphans_and_torn_metadata_are_cleaned_at_startup(disk: Path) -> None:
    store = disk_store(disk)
    put(store, mk("http://a/1"), b"one")
    put(store, mk("http://a/2"), b"two")
    # Crash between the body rename and the metadata rename: a body nothing names.
    some_dir = files(disk / "objects", "*.meta")[0].parent
    orphan = some_dir / "ffff.deadbeef.body"
    orphan.write_bytes(b"orphan")
    # A torn metadata file (half written, then renamed by a buggy tool or disk error).
    meta = store.disk.meta_path(object_id(mk("http://a/2")))  # type: ignore[union-attr]
    meta.write_bytes(meta.read_bytes()[:40])
    # Garbage in tmp/.
    (disk / "tmp" / "x.tmp").write_bytes(b"junk")
    again = disk_store(disk)
    assert not orphan.exists()
    assert not meta.exists()
    assert again.get("http://a/2", []) is None
    assert body_of(again, "http://a/1") == b"one"
    assert len(files(disk / "objects", "*.body")) == 1
    assert files(disk / "tmp", "*") == []


def _body_file(store: CacheStore, url: str) -> Path:
    assert store.disk is not None
    path = store.disk.body_file(object_id(mk(url)))
    assert path is not None
    return path


def test_truncated_committed_body_is_never_served(disk: Path) -> None:
    store = disk_store(disk)
    put(store, mk("http://a/small"), b"s" * 1000)
    put(store, mk("http://a/big"), b"b" * 100_000)
    for url in ("http://a/small", "http://a/big"):
        path = _body_file(store, url)
        path.write_bytes(path.read_bytes()[:-10])
    # While running: the length check at open drops it.
    assert store.get("http://a/big", []) is None
    # After a restart: the length check at startup drops it.
    again = disk_store(disk)
    assert again.get("http://a/small", []) is None
    assert again.stats().disk_objects == 0


def _flip_byte(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_small_body_is_dropped_on_open(disk: Path) -> None:
    store = disk_store(disk)
    put(store, mk(), b"s" * 1000)
    _flip_byte(_body_file(store, URL), 500)
    again = disk_store(disk)  # lengths still match: loaded
    assert again.stats().disk_objects == 1
    assert again.get(URL, []) is None
    assert again.stats().disk_objects == 0
    assert files(disk / "objects", "*.body") == []


def test_corrupted_large_body_is_never_delivered_complete(disk: Path) -> None:
    store = disk_store(disk)
    body = os.urandom(300_000)
    put(store, mk(), body)
    _flip_byte(_body_file(store, URL), 299_000)
    again = disk_store(disk)
    obj = again.get(URL, [])
    assert obj is not None and obj.tier == "disk"
    received = bytearray()
    with obj, pytest.raises(CorruptObjectError):
        for chunk in obj.iter_chunks(64 * KiB):
            received += chunk
    assert len(received) < len(body)  # the last chunk was withheld
    assert again.get(URL, []) is None  # and the object is gone


def test_verify_on_start_drops_corrupted_bodies(disk: Path) -> None:
    store = disk_store(disk)
    put(store, mk("http://a/1"), b"1" * 50_000)
    put(store, mk("http://a/2"), b"2" * 50_000)
    _flip_byte(_body_file(store, "http://a/1"), 7)
    again = disk_store(disk, verify_on_start=True)
    assert again.stats().disk_objects == 1
    assert again.get("http://a/1", []) is None
    assert body_of(again, "http://a/2") == b"2" * 50_000


def test_last_commit_wins_and_old_readers_keep_their_view(disk: Path) -> None:
    store = disk_store(disk)
    old, new = b"o" * 200_000, b"n" * 150_000
    put(store, mk(), old)
    reader = store.get(URL, [])
    assert reader is not None and reader.tier == "disk"
    w1, w2 = store.begin(mk(t=NOW + 1)), store.begin(mk(t=NOW + 2))
    w1.write(b"1" * 100_000)
    w2.write(new)
    assert w2.commit()
    assert w1.commit()  # committed last: wins
    with reader:
        assert reader.body() == old  # old descriptor, old complete body
    assert body_of(store, URL) == b"1" * 100_000
    assert store.variants(URL)[0].response_time == NOW + 1
    assert len(files(disk / "objects", "*.body")) == 1
    assert body_of(disk_store(disk), URL) == b"1" * 100_000


def test_vary_variants_and_purge(disk: Path) -> None:
    store = disk_store(disk)
    gz = [(b"Accept-Encoding", b"gzip")]
    br = [(b"Accept-Encoding", b"br")]
    put(store, mk(vary=b"Accept-Encoding", req=gz), b"gzip body")
    put(store, mk(vary=b"Accept-Encoding", req=br), b"br body")
    # A copy keyed by destination (Host did not match the intercepted address).
    put(store, mk(key=URL + " @10.0.0.9:80"), b"dest copy")
    put(store, mk("http://example.com/keep"), b"keep")
    assert body_of(store, URL, gz) == b"gzip body"
    assert body_of(store, URL, br) == b"br body"
    assert len(store.variants(URL)) == 2
    assert len(store.object_ids_for_url(URL)) == 3
    assert store.purge_url(URL) == 3
    assert store.variants(URL) == [] and store.variants(URL + " @10.0.0.9:80") == []
    assert body_of(store, "http://example.com/keep") == b"keep"
    assert disk_store(disk).variants(URL) == []  # gone from disk, too
    assert store.purge_url(URL) == 0


def test_delete_and_purge_all(disk: Path) -> None:
    store = disk_store(disk)
    for i in range(5):
        put(store, mk(f"http://a/{i}"), b"x" * (i + 1) * 1000)
    assert store.delete("http://a/0") == 1
    assert store.get("http://a/0", []) is None
    s = store.stats()
    assert s.disk_objects == 4 and s.objects == 4
    assert store.purge_all() == 4
    s = store.stats()
    assert (s.disk_objects, s.disk_bytes, s.memory_objects, s.memory_bytes) == (0, 0, 0, 0)
    assert files(disk / "objects", "*.body") == [] and files(disk / "objects", "*.meta") == []


def test_update_entry_after_304_keeps_body(disk: Path) -> None:
    store = disk_store(disk)
    body = os.urandom(40_000)
    put(store, mk(), body)
    refreshed = mk(t=NOW + 100, extra=[(b"X-New", b"1")])
    assert store.update_entry(refreshed)
    assert store.variants(URL)[0].response_time == NOW + 100
    again = disk_store(disk)
    (e,) = again.variants(URL)
    assert (b"X-New", b"1") in e.headers and e.body_length == len(body)
    assert body_of(again, URL) == body
    assert not store.update_entry(mk("http://a/none"))


def test_objects_of_the_blake2b_format_are_dropped_at_startup(disk: Path) -> None:
    """TPXC1 metadata recorded blake2b body digests, which the CRC check would call corrupt
    mid-stream: such objects go at startup, files and all, and are fetched again."""
    store = disk_store(disk)
    put(store, mk(), os.urandom(100_000))
    (meta,) = files(disk / "objects", "*.meta")
    raw = meta.read_bytes()
    assert raw.startswith(b"TPXC2 ")
    meta.write_bytes(b"TPXC1 " + raw[len(b"TPXC2 ") :])
    again = disk_store(disk)
    assert again.variants(URL) == []
    assert files(disk / "objects", "*.meta") == [] and files(disk / "objects", "*.body") == []


def test_select_hit_matches_select_and_open(disk: Path) -> None:
    """select_hit() = select() + the memory body open() would give, for every kind of object."""
    store = disk_store(disk)
    gz = [(b"Accept-Encoding", b"gzip")]
    small, big = os.urandom(5000), os.urandom(300_000)
    put(store, mk("http://a/small"), small)  # memory (and disk)
    put(store, mk("http://a/big"), big)  # disk only
    put(store, mk("http://a/vary", vary=b"Accept-Encoding", req=gz), b"gz")
    put(store, mk("http://a/two", vary=b"Accept-Encoding", req=gz), b"two gz")
    put(store, mk("http://a/two", vary=b"Accept-Encoding", req=[]), b"two plain")
    for key in ("http://a/small", "http://a/big", "http://a/vary", "http://a/two", "http://a/x"):
        for req in ([], gz, [(b"Accept-Encoding", b"br")]):
            entry, body = store.select_hit(key, req)
            assert entry == store.select(key, req)
            if body is not None:
                assert entry is not None and store.memory_body(entry) == body
                obj = store.open(entry)
                assert obj is not None and obj.tier == "memory" and obj.body() == body
    assert store.select_hit("http://a/small", [])[1] == small
    entry, body = store.select_hit("http://a/big", [])
    assert entry is not None and body is None and store.memory_body(entry) is None
    # A refreshed entry replaces the one a hit holds: the old one no longer gets a body.
    old = store.select("http://a/small", [])
    assert old is not None and store.update_entry(mk("http://a/small", t=NOW + 5))
    assert store.memory_body(old) is None
    new, body = store.select_hit("http://a/small", [])
    assert new is not None and new.response_time == NOW + 5 and body == small


def test_threads_share_one_store(disk: Path) -> None:
    store = disk_store(disk, disk_size=2 * MiB, memory_size=256 * KiB)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(40):
                url = f"http://a/{(n * 7 + i) % 25}"
                data = url.encode() * (200 + i * 40)
                w = store.begin(mk(url))
                w.write(data)
                w.commit()
                obj = store.get(url, [])
                if obj is not None:
                    with obj:
                        got = obj.body()
                    assert got.startswith(url.encode()) and len(got) % len(url) == 0
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = store.stats()
    assert s.disk_bytes <= 2 * MiB and s.memory_bytes <= 256 * KiB
    assert len(files(disk / "objects", "*.body")) == s.disk_objects
    assert files(disk / "tmp", "*") == []


# -- config ----------------------------------------------------------------------------------


def test_cache_config_defaults_and_values() -> None:
    assert parse({}).sections["cache"] == CacheConfig()
    cfg = parse(
        {
            "cache": {
                "enabled": False,
                "memory_size": "64MiB",
                "disk_dir": "/srv/cache",
                "disk_size": "2GiB",
                "max_object_size": "100MiB",
                "max_memory_object_size": "512KiB",
                "heuristic_fraction": 0.2,
                "heuristic_max": "1h",
                "x_cache_header": True,
                "share_on_host_match": False,
            }
        }
    ).sections["cache"]
    assert cfg == CacheConfig(
        enabled=False,
        memory_size=64 * MiB,
        disk_dir="/srv/cache",
        disk_size=2 * 1024 * MiB,
        max_object_size=100 * MiB,
        max_memory_object_size=512 * KiB,
        heuristic_fraction=0.2,
        heuristic_max=3600.0,
        x_cache_header=True,
        share_on_host_match=False,
    )
    memory_only = parse({"cache": {"disk_size": 0}}).sections["cache"]
    assert CacheStore.from_config(memory_only).disk is None


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"disk_dir": "relative/dir"}, "cache.disk_dir"),
        ({"memory_size": "1MiB", "max_memory_object_size": "2MiB"}, "cache.max_memory_object_size"),
        ({"disk_size": "10MiB", "max_object_size": "20MiB"}, "cache.max_object_size"),
        ({"heuristic_fraction": 1.5}, "cache.heuristic_fraction"),
        ({"memory_size": "lots"}, "cache.memory_size"),
        ({"x_cache": True}, "cache.x_cache"),
    ],
)
def test_cache_config_errors(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        parse({"cache": table})
    # config.parse() calls finish() on the section again, so an unknown key may be listed twice.
    assert {e.key for e in info.value.errors} == {key}


def test_printing_the_rules_does_not_touch_the_cache_directory(tmp_path: Path) -> None:
    # `tproxy rules show` builds the daemon's components for their share of the rules; the
    # cache's disk tier is opened (created, scanned, test-written) only when the daemon starts.
    cache_dir = tmp_path / "not" / "yet"
    conf = tmp_path / "t.toml"
    conf.write_text(
        '[proxy]\nlan_interfaces = ["lan0"]\n'
        f'[cache]\nenabled = true\ndisk_dir = "{cache_dir}"\n[control]\nenabled = false\n'
    )
    res = subprocess.run(
        [sys.executable, "-m", "tproxy.cli", "rules", "show", "--config", str(conf)],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "TPROXY --on-port" in res.stdout
    assert not (tmp_path / "not").exists()

"""Object store for the HTTP cache: a memory tier (cachetools LRU) over a disk tier.

One small interface, :class:`CacheStore`:

* ``variants(key)`` → the :class:`~tproxy.cache.policy.CacheEntry` of every stored variant of a
  primary key; ``select(key, request_headers)`` picks the Vary match. No I/O for a key nothing
  is stored under, nor for objects in memory; see "RAM" below for disk objects.
* ``open(object_id)`` → :class:`StoredObject` (``body()``, ``iter_chunks()``) or None.
* ``begin(entry)`` → :class:`Writer` (``write``, ``commit``, ``abort``).
* ``update_entry(entry)`` (after a 304), ``delete(key)``, ``purge_url(url)``, ``purge_all()``,
  ``stats()``.

Disk layout under ``disk_dir``::

    tmp/                      bodies and metadata being written (removed at startup)
    objects/ab/<hash>.meta    "TPXC2 <blake2b of JSON>\\n" + JSON (entry, body name, length, check)
    objects/ab/<hash>.<gen>.body

A body is written to ``tmp/``, then renamed into ``objects/``; then the metadata, which names that
body file, is written to ``tmp/`` and renamed over the old ``.meta``. rename(2) is atomic, so a
crash at any point leaves either the old object or the new one, plus orphans that startup removes.
Bodies carry a length and a CRC-32: the length is checked at commit and at startup, the
CRC whenever a body is read (see :meth:`StoredObject.iter_chunks`), so a torn or corrupted file
is never served complete. Files are not fsync'd by default: the cache can always refetch, and the
checks above catch what a power loss leaves behind.

A new generation of a body gets a new file name, so "last commit wins" and a reader holding the old
file descriptor keeps reading the old, complete body after it is unlinked.

RAM: the disk index keeps no headers. Each disk object costs one OrderedDict slot (LRU order),
its id string and one packed int (body length and CRC-32, metadata size, body generation):
about 250 bytes with a typical URL (measured by tests/test_cache_store_ram.py; full entries
cost ~3.4 KB each). Vary variants and destination-keyed copies add a small tuple and a slot in
the secondary indexes. A lookup that needs a disk object's entry reads its ``.meta`` file (one
small, usually page-cached read, under the lock) and keeps the entry in a small LRU bounded in
bytes (``LOADED_ENTRIES_SIZE``); objects small enough for the memory tier are promoted there by
:meth:`CacheStore.open` with their entry. ``stats().index_bytes`` estimates all of it (within
~25% of tracemalloc, tested) from running sums.

Thread safety: cachetools is not thread-safe; every public method takes one lock and keeps its
critical section short (index updates, a rename, an open, a metadata read). Reading a body
happens outside the lock on the reader's own descriptor, so the shell may run big reads and
commits in a thread while the event loop keeps using the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

from cachetools import Cache, LRUCache

from tproxy.cache.policy import CacheEntry, Fields, Headers, hot, vary_key, vary_matches
from tproxy.config import Reader, register_section

log = logging.getLogger("tproxy.cache")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

CHUNK_SIZE = 64 * KiB
DIGEST_SIZE = 16  # blake2b-128 of the metadata: corruption detection, not adversarial
# TPXC1 checked bodies with blake2b; its objects are dropped at startup (the cache refetches).
META_MAGIC = b"TPXC2"
META_MAX_SIZE = 1 * MiB  # a larger .meta is not ours: skip it
# Full entries of disk objects kept after a lookup read them from their metadata (bytes, as
# _entry_size estimates them): the hot disk-only objects (those too large for the memory
# tier) are looked up without reading the disk, and the same entry object serves select()
# and open(), and keeps its serialised heads (policy.hot) between hits.
LOADED_ENTRIES_SIZE = 4 * MiB
Tier = Literal["memory", "disk"]


# Vary variants kept per primary key: ``Vary: User-Agent`` can make one per client, and each
# costs an index slot and a metadata file; the oldest variant gives way to a new one.
MAX_VARIANTS = 32


class CacheDirError(OSError):
    """The cache's ``disk_dir`` cannot be created or written; the message names it."""


class CorruptObjectError(Exception):
    """A stored body did not match its recorded length or digest; it has been dropped."""


def object_id(entry: CacheEntry) -> str:
    """One stored object per primary key and Vary selection."""
    return object_id_of(entry.key, entry.vary_key)


def object_id_of(key: str, vary_key: str) -> str:
    return f"{key}\x1f{vary_key}" if vary_key else key


def _may_select(oid: str, key: str, request: Fields) -> bool:
    """Whether the object ``oid`` stored under primary key ``key`` can be selected for a
    request with these fields, judged from the id alone: its Vary selection (policy.vary_key:
    sorted ``name=value`` / ``name!`` lines) is recomputed for the request and compared.
    False only when it certainly does not match (then its metadata need not be read); the
    entry's own check (policy.vary_matches) still decides for the rest."""
    if oid == key:
        return True  # no Vary selection
    prefix = key + "\x1f"
    if not oid.startswith(prefix):
        return True
    stored = oid[len(prefix) :]
    if stored == "*":
        return False
    names = []
    for part in stored.split("\n"):
        name, eq, _ = part.partition("=")
        names.append(name if eq else part[:-1])
    return vary_key([",".join(names).encode("latin-1")], request) == stored


class _BodyCheck:
    """CRC-32 of a body, as the digest the metadata records.

    The check guards against torn writes and media errors, not an adversary (only the daemon
    writes the cache directory), and it runs on every read of a body: zlib's CRC-32 is about
    7x faster here than blake2b (measured 11 µs against 76 µs per 64 KiB), which is most of
    the cost of a disk hit. With the recorded length it catches every burst error up to 32
    bits and misses a random corruption with probability 2^-32.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"crc32:{self.value:08x}"


def _digest() -> _BodyCheck:
    return _BodyCheck()


def _entry_size(entry: CacheEntry) -> int:
    """Estimated RAM of a parsed entry (see ENTRY_BASE_BYTES)."""
    fields = sum(len(n) + len(v) + ENTRY_FIELD_BYTES for n, v in entry.headers)
    return ENTRY_BASE_BYTES + fields + len(entry.key) + len(entry.url) + len(entry.vary_key)


# -- serialisation ---------------------------------------------------------------------------


def _entry_to_json(entry: CacheEntry) -> dict[str, Any]:
    return {
        "method": entry.method.decode("latin-1"),
        "key": entry.key,
        "url": entry.url,
        "status": entry.status,
        "reason": entry.reason.decode("latin-1"),
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in entry.headers],
        "request_time": entry.request_time,
        "response_time": entry.response_time,
        "vary_key": entry.vary_key,
        "body_length": entry.body_length,
    }


def _entry_from_json(d: dict[str, Any]) -> CacheEntry:
    return CacheEntry(
        method=str(d["method"]).encode("latin-1"),
        key=str(d["key"]),
        url=str(d["url"]),
        status=int(d["status"]),
        reason=str(d.get("reason", "")).encode("latin-1"),
        headers=tuple(
            (str(n).encode("latin-1"), str(v).encode("latin-1")) for n, v in d["headers"]
        ),
        request_time=float(d["request_time"]),
        response_time=float(d["response_time"]),
        vary_key=str(d.get("vary_key", "")),
        body_length=None if d.get("body_length") is None else int(d["body_length"]),
    )


def _encode_meta(doc: dict[str, Any]) -> bytes:
    payload = json.dumps(doc, separators=(",", ":")).encode()
    check = hashlib.blake2b(payload, digest_size=DIGEST_SIZE).hexdigest().encode()
    return META_MAGIC + b" " + check + b"\n" + payload


def _decode_meta(data: bytes) -> dict[str, Any] | None:
    head, nl, payload = data.partition(b"\n")
    parts = head.split(b" ")
    if not nl or len(parts) != 2 or parts[0] != META_MAGIC:
        return None
    if hashlib.blake2b(payload, digest_size=DIGEST_SIZE).hexdigest().encode() != parts[1]:
        return None  # torn or corrupted metadata
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


# -- reading ---------------------------------------------------------------------------------


class StoredObject:
    """One stored response: its entry and its body, from memory or from an open file.

    Close it (or use ``with``) when done; a disk object holds a file descriptor, which also
    keeps the body readable if a newer commit replaces it meanwhile.
    """

    def __init__(
        self,
        oid: str,
        entry: CacheEntry,
        tier: Tier,
        *,
        data: bytes | None = None,
        file: BinaryIO | None = None,
        length: int = 0,
        digest: str = "",
        on_corrupt: Any = None,
    ) -> None:
        self.object_id = oid
        self.entry = entry
        self.tier: Tier = tier
        self._data = data
        self._file = file
        self.length = len(data) if data is not None else length
        self._digest = digest
        self._on_corrupt = on_corrupt

    def __enter__(self) -> StoredObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _corrupt(self, why: str) -> CorruptObjectError:
        if self._on_corrupt is not None:
            self._on_corrupt(self.object_id)
        return CorruptObjectError(f"{self.entry.url}: {why}")

    def body(self) -> bytes:
        """The whole body, verified."""
        if self._data is not None:
            return self._data
        return b"".join(self.iter_chunks())

    def iter_chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The body in chunks, verified against the stored digest.

        The last chunk is held back until the digest has been checked: a corrupted body raises
        :class:`CorruptObjectError` before its end is delivered, so the client sees a short
        (incomplete) response rather than a complete wrong one.
        """
        if self._data is not None:
            for pos in range(0, len(self._data), chunk_size):
                yield self._data[pos : pos + chunk_size]
            return
        f = self._file
        if f is None:
            raise ValueError("object is closed")
        f.seek(0)
        hasher = _digest()
        total = 0
        pending: bytes | None = None
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                break
            hasher.update(chunk)
            total += len(chunk)
            if pending is not None:
                yield pending
            pending = chunk
        if total != self.length or hasher.hexdigest() != self._digest:
            raise self._corrupt(f"body length {total}/{self.length} or digest mismatch")
        if pending is not None:
            yield pending

    def iter_range(self, start: int, end: int, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Bytes ``start..end`` inclusive (a 206). A partial read cannot check the digest; the
        length was checked when the object was opened."""
        if self._data is not None:
            for pos in range(start, end + 1, chunk_size):
                yield self._data[pos : min(pos + chunk_size, end + 1)]
            return
        f = self._file
        if f is None:
            raise ValueError("object is closed")
        f.seek(start)
        left = end + 1 - start
        while left > 0:
            chunk = f.read(min(chunk_size, left))
            if not chunk:
                raise self._corrupt("body shorter than recorded")
            left -= len(chunk)
            yield chunk


# -- tiers -----------------------------------------------------------------------------------


class _MemObject:
    """A memory-tier object: the full entry and the body."""

    __slots__ = ("data", "entry", "entry_bytes")

    def __init__(self, entry: CacheEntry, data: bytes) -> None:
        self.entry = entry
        self.data = data
        self.entry_bytes = _entry_size(entry)


def _mem_size(obj: _MemObject) -> int:
    return len(obj.data) + obj.entry_bytes + MEM_SLOT_BYTES


class _LRU(LRUCache[str, _MemObject]):
    """The memory tier. cachetools has no eviction callback; overriding popitem is its
    documented hook. ``entry_bytes`` follows every insertion and removal, so :meth:`stats`
    never walks the tier."""

    def __init__(self, maxsize: int, on_evict: Any) -> None:
        super().__init__(maxsize, getsizeof=_mem_size)
        self._on_evict = on_evict
        self.entry_bytes = 0

    def __setitem__(self, key: str, value: _MemObject) -> None:
        if key in self:  # replace as delete + insert, so the running sum stays exact
            del self[key]
        super().__setitem__(key, value)
        self.entry_bytes += value.entry_bytes

    def __delitem__(self, key: str) -> None:
        value = Cache.__getitem__(self, key)  # no LRU refresh
        super().__delitem__(key)
        self.entry_bytes -= value.entry_bytes

    def popitem(self) -> tuple[str, _MemObject]:
        key, value = super().popitem()
        self._on_evict(key, value)
        return key, value


# A disk object's index record. Everything the store needs without reading the metadata file
# is packed into one int — the body's length and CRC-32, the metadata's size and the body
# file's generation — because one 5-digit int (48 bytes) is far smaller than any object
# holding the same fields (a slotted instance alone is 80 bytes, plus an int per field). The
# response headers stay on disk: lookups read them from the .meta file (see _Loaded).
# Layout, low bits first: generation | CRC-32 | metadata size | body length (unbounded).
GEN_BITS = 48  # body files are named <hash>.<12 hex digits>.body
CHECK_BITS = 32
META_SIZE_BITS = 21  # ≥ META_MAX_SIZE: larger metadata is refused when written
_GEN_MASK = (1 << GEN_BITS) - 1
_CHECK_MASK = (1 << CHECK_BITS) - 1
_META_MASK = (1 << META_SIZE_BITS) - 1
_CHECK_SHIFT = GEN_BITS
_META_SHIFT = GEN_BITS + CHECK_BITS
_LENGTH_SHIFT = GEN_BITS + CHECK_BITS + META_SIZE_BITS
CHECK_PREFIX = "crc32:"


def _pack(length: int, meta_size: int, check: int, gen: int) -> int:
    return (((length << META_SIZE_BITS | meta_size) << CHECK_BITS | check) << GEN_BITS) | gen


def _p_gen(p: int) -> int:
    return p & _GEN_MASK


def _p_check(p: int) -> str:
    return f"{CHECK_PREFIX}{(p >> _CHECK_SHIFT) & _CHECK_MASK:08x}"


def _p_meta_size(p: int) -> int:
    return (p >> _META_SHIFT) & _META_MASK


def _p_length(p: int) -> int:
    return p >> _LENGTH_SHIFT


def _p_size(p: int) -> int:
    """Disk bytes of the object: body and metadata."""
    return _p_length(p) + _p_meta_size(p)


def _parse_check(text: str) -> int | None:
    if not text.startswith(CHECK_PREFIX) or len(text) != len(CHECK_PREFIX) + 8:
        return None
    try:
        return int(text[len(CHECK_PREFIX) :], 16)
    except ValueError:
        return None


# The record of an object whose id is its primary key and its URL (no Vary, shared key — the
# common case) is the packed int alone. Any other record is (packed, key or None, url or None)
# with a name only where it differs from the object id, so evicting it can clean the
# secondary indexes (CacheStore._variants, CacheStore._url_ids) without reading the disk.
_Record = int | tuple[int, str | None, str | None]


def _packed(record: _Record) -> int:
    return record if isinstance(record, int) else record[0]


def _names(oid: str, record: _Record) -> tuple[str, str]:
    """The primary key and URL of a disk object."""
    if isinstance(record, int):
        return oid, oid
    return record[1] or oid, record[2] or oid


def _make_record(oid: str, key: str, url: str, packed: int) -> _Record:
    if key == oid and url == oid:
        return packed
    return (packed, None if key == oid else key, None if url == oid else url)


# RAM estimates (CPython 3.11, 64-bit), measured with tracemalloc and asserted in
# tests/test_cache_store_ram.py: what an OrderedDict slot costs amortised over its growth
# (hash table, entries array, linked-list node); a dict slot; a small tuple.
ODICT_SLOT_BYTES = 90
DICT_SLOT_BYTES = 50
TUPLE_BYTES = 64
# A memory-tier object beyond its entry and body: the LRU's data, size and order dict slots
# and the _MemObject itself.
MEM_SLOT_BYTES = 3 * ODICT_SLOT_BYTES + 64
# A parsed CacheEntry: the dataclass and its dict, the header tuple, the Fields index (a
# dict of lists) and the hot-path memo; each field line costs two bytes objects, a tuple and
# its index slot. Fitted to tracemalloc over 0..30 field lines (within ~10%).
ENTRY_BASE_BYTES = 700
ENTRY_FIELD_BYTES = 300


def _ram(obj: object) -> int:
    """sys.getsizeof rounded up to pymalloc's 8-byte blocks."""
    return (sys.getsizeof(obj) + 7) & ~7


def _record_ram(oid: str, record: _Record) -> int:
    """Estimated RAM of one disk record: its index slot, id and packed int, and for a record
    with names its tuple and its share of the secondary indexes."""
    ram = ODICT_SLOT_BYTES + _ram(oid) + _ram(_packed(record))
    if not isinstance(record, int):
        ram += TUPLE_BYTES
        for name in record[1:]:
            if name is not None:
                # Its id in a tuple under the name, the name's slot, and (conservatively)
                # the name itself, which a variant sharing it does not duplicate.
                ram += DICT_SLOT_BYTES + TUPLE_BYTES + _ram(name)
    return ram


class _DiskTier:
    """Files under ``directory`` with an in-memory LRU index rebuilt at startup.

    The index holds one compact :data:`_Record` per object (no headers): about 250 bytes
    with a typical URL, so a million objects cost about 250 MB less than full entries would.

    The LRU order after a restart is the order of the metadata files' modification times (the
    last commit or 304 update); hits are not written back to disk to keep hits free of writes.
    """

    def __init__(self, directory: Path, limit: int, *, fsync: bool, verify: bool) -> None:
        self.dir = directory
        self.tmp = directory / "tmp"
        self.objects = directory / "objects"
        self.limit = limit
        self.fsync = fsync
        self.index: OrderedDict[str, _Record] = OrderedDict()
        self.bytes = 0
        self.ram = 0  # estimated RAM of the index (see _record_ram)
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            self.objects.mkdir(parents=True, exist_ok=True)
            # Root ignores permission bits; a write is the only real test (read-only mount,
            # full disk, a file where a directory should be).
            probe, f = self.temp_file()
            f.close()
            probe.unlink()
        except OSError as exc:
            raise CacheDirError(
                f"cache disk_dir {directory} cannot be used: {exc.strerror or exc} "
                f'({exc.filename or directory}); fix it or set disk_dir = "" for memory only'
            ) from exc
        self._load(verify)

    # paths
    @staticmethod
    def name_of(oid: str) -> str:
        return hashlib.blake2b(oid.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()

    def meta_path(self, oid: str) -> Path:
        name = self.name_of(oid)
        return self.objects / name[:2] / f"{name}.meta"

    @classmethod
    def body_name(cls, oid: str, packed: int) -> str:
        return f"{cls.name_of(oid)}.{_p_gen(packed):012x}.body"

    def body_path(self, body_name: str) -> Path:
        return self.objects / body_name[:2] / body_name

    def body_file(self, oid: str) -> Path | None:
        """The body file of a stored object (None when absent)."""
        record = self.index.get(oid)
        return None if record is None else self.body_path(self.body_name(oid, _packed(record)))

    def temp_file(self) -> tuple[Path, BinaryIO]:
        path = self.tmp / f"{secrets.token_hex(8)}.tmp"
        return path, open(path, "xb")  # the Writer owns and closes it

    # the index and its accounting
    def _put(self, oid: str, record: _Record) -> None:
        old = self.index.get(oid)
        if old is not None:
            self.bytes -= _p_size(_packed(old))
            self.ram -= _record_ram(oid, old)
        self.index[oid] = record
        self.index.move_to_end(oid)
        self.bytes += _p_size(_packed(record))
        self.ram += _record_ram(oid, record)

    def _pop(self, oid: str) -> _Record | None:
        record = self.index.pop(oid, None)
        if record is not None:
            self.bytes -= _p_size(_packed(record))
            self.ram -= _record_ram(oid, record)
        return record

    # startup
    def _load(self, verify: bool) -> None:
        for leftover in self.tmp.iterdir():  # writes a crash interrupted
            with contextlib.suppress(OSError):
                leftover.unlink()
        found: list[tuple[float, str, _Record]] = []
        # os.scandir and plain strings, not pathlib: pathlib interns every path part, and
        # the interpreter's interned-string table would keep the size it reached for a
        # million file names (~90 bytes an object) after startup.
        for sub in sorted(os.scandir(self.objects), key=lambda d: d.name):
            if not sub.is_dir():
                continue
            metas: list[str] = []
            bodies: list[str] = []
            for item in os.scandir(sub.path):
                if item.name.endswith(".meta"):
                    metas.append(item.name)
                elif item.name.endswith(".body"):
                    bodies.append(item.name)
            referenced: set[str] = set()
            for name in metas:
                path = os.path.join(sub.path, name)
                loaded = self._load_one(sub.path, name, verify)
                if loaded is None:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    continue
                oid, record, mtime, body_name = loaded
                referenced.add(body_name)
                found.append((mtime, oid, record))
            for name in bodies:  # bodies no metadata names: a crash between the renames
                if name not in referenced:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(sub.path, name))
        found.sort(key=lambda t: t[0])
        for _, oid, record in found:
            self._put(oid, record)
        del found
        self.evict_to(self.limit)

    def _load_one(
        self, directory: str, meta_name: str, verify: bool
    ) -> tuple[str, _Record, float, str] | None:
        """(id, record, mtime, body file name) of one metadata file; None if it is not a
        valid object of this format (the caller removes it)."""
        try:
            with open(os.path.join(directory, meta_name), "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size > META_MAX_SIZE:
                    return None
                raw = f.read(META_MAX_SIZE + 1)
            doc = _decode_meta(raw)
            if doc is None:
                return None
            e = doc["entry"]
            key, url = str(e["key"]), str(e["url"])
            oid = object_id_of(key, str(e.get("vary_key", "")))
            name = self.name_of(oid)
            if str(doc.get("id", oid)) != oid or meta_name != f"{name}.meta":
                return None  # not where this id's metadata belongs
            if os.path.basename(directory) != name[:2]:
                return None
            body_name = str(doc["body"])
            length = int(doc["length"])
            check = _parse_check(str(doc["digest"]))
            stem, _, gen_text = body_name.removesuffix(".body").partition(".")
            if check is None or stem != name or len(gen_text) != 12 or length < 0:
                return None
            packed = _pack(length, len(raw), check, int(gen_text, 16))
            body = os.path.join(directory, body_name)
            if os.stat(body).st_size != length:
                with contextlib.suppress(OSError):
                    os.unlink(body)
                return None
            if verify:
                hasher = _digest()
                with open(body, "rb") as f:
                    while chunk := f.read(1 * MiB):
                        hasher.update(chunk)
                if hasher.hexdigest() != _p_check(packed):
                    os.unlink(body)
                    return None
            return oid, _make_record(oid, key, url, packed), st.st_mtime, body_name
        except (OSError, KeyError, TypeError, ValueError, AttributeError):
            return None

    # lookups (caller holds the store lock)
    def read_entry(self, oid: str) -> CacheEntry | None:
        """The full entry of a stored object, from its metadata file; None when that file is
        missing, corrupt or names another body (the caller then drops the object)."""
        record = self.index.get(oid)
        if record is None:
            return None
        packed = _packed(record)
        try:
            raw = self.meta_path(oid).read_bytes()
            doc = _decode_meta(raw)
            if doc is None or doc.get("body") != self.body_name(oid, packed):
                return None
            entry = _entry_from_json(doc["entry"])
        except (OSError, KeyError, TypeError, ValueError, AttributeError):
            return None
        return entry if object_id(entry) == oid else None

    # mutation (caller holds the store lock)
    def write_meta(self, oid: str, entry: CacheEntry, packed: int) -> int | None:
        """Publish the metadata of ``oid``; its size, or None when it is too large to store."""
        doc = {
            "id": oid,
            "body": self.body_name(oid, packed),
            "length": _p_length(packed),
            "digest": _p_check(packed),
            "entry": _entry_to_json(entry),
        }
        data = _encode_meta(doc)
        if len(data) > META_MAX_SIZE:
            return None
        tmp_path, f = self.temp_file()
        try:
            with f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            final = self.meta_path(oid)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp_path, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
            raise
        return len(data)

    def install(
        self, oid: str, tmp_body: Path, entry: CacheEntry, length: int, check: int
    ) -> list[tuple[str, _Record]] | None:
        """Move a finished body into place and publish its metadata; returns the evicted
        records, or None when the object cannot be stored (its metadata is too large)."""
        packed = _pack(length, 0, check, secrets.randbits(GEN_BITS))
        final = self.body_path(self.body_name(oid, packed))
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp_body, final)
        try:
            meta_size = self.write_meta(oid, entry, packed)
        except BaseException:
            with contextlib.suppress(OSError):
                final.unlink()
            raise
        if meta_size is None:
            with contextlib.suppress(OSError):
                final.unlink()
            return None
        packed = _pack(length, meta_size, check, _p_gen(packed))
        old = self._pop(oid)
        if old is not None and _p_gen(_packed(old)) != _p_gen(packed):
            with contextlib.suppress(OSError):
                self.body_path(self.body_name(oid, _packed(old))).unlink()
        self._put(oid, _make_record(oid, entry.key, entry.url, packed))
        return self.evict_to(self.limit)

    def update_entry(self, oid: str, entry: CacheEntry) -> bool:
        old = self.index.get(oid)
        if old is None:
            return False
        p = _packed(old)
        meta_size = self.write_meta(oid, entry, p)
        if meta_size is None:
            return False
        packed = _pack(_p_length(p), meta_size, (p >> _CHECK_SHIFT) & _CHECK_MASK, _p_gen(p))
        self._put(oid, _make_record(oid, entry.key, entry.url, packed))
        return True

    def remove(self, oid: str) -> _Record | None:
        record = self._pop(oid)
        if record is None:
            return None
        body = self.body_path(self.body_name(oid, _packed(record)))
        for path in (self.meta_path(oid), body):
            with contextlib.suppress(OSError):
                path.unlink()
        return record

    def evict_to(self, limit: int) -> list[tuple[str, _Record]]:
        evicted: list[tuple[str, _Record]] = []
        while self.bytes > limit and self.index:
            oid = next(iter(self.index))
            record = self.remove(oid)
            if record is not None:
                evicted.append((oid, record))
        return evicted


# -- writing ---------------------------------------------------------------------------------


class Writer:
    """Collects one response body. ``write`` returns False once the object is no longer going
    to be stored (too large, aborted); the caller then just stops calling it."""

    def __init__(self, store: CacheStore, entry: CacheEntry) -> None:
        self._store = store
        self.entry = entry
        self.object_id = object_id(entry)
        self._hasher = _digest()
        self._length = 0
        self._chunks: list[bytes] | None = [] if store.max_memory_object_size > 0 else None
        self._tmp: Path | None = None
        self._file: BinaryIO | None = None
        self.active = True
        limit = store.max_object_size if store.disk is not None else store.max_memory_object_size
        self._limit = limit
        if entry.body_length is not None and entry.body_length > limit:
            self.active = False
            self._chunks = None
        elif store.disk is not None:
            try:
                self._tmp, self._file = store.disk.temp_file()
            except OSError as exc:  # a full disk, no descriptors left: just do not store
                log.warning("cache: not storing %s: %s", entry.url, exc)
                self.active = False
                self._chunks = None

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.abort()

    @property
    def length(self) -> int:
        return self._length

    def write(self, chunk: bytes) -> bool:
        if not self.active:
            return False
        self._length += len(chunk)
        if self._length > self._limit:
            self.abort()
            return False
        self._hasher.update(chunk)
        if self._chunks is not None:
            if self._length <= self._store.max_memory_object_size:
                self._chunks.append(chunk)
            else:
                self._chunks = None  # too big for the memory tier; disk only
        if self._file is not None:
            try:
                self._file.write(chunk)
            except OSError as exc:
                # ENOSPC, EIO: the response still streams to its client; only storing stops
                # (an exception here would have broken the client's transfer).
                log.warning("cache: not storing %s: %s", self.entry.url, exc)
                self.abort()
                return False
        return True

    def abort(self) -> None:
        self.active = False
        self._chunks = None
        if self._file is not None:
            with contextlib.suppress(OSError):  # close flushes, which fails on a full disk
                self._file.close()
            self._file = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink()
            self._tmp = None

    def commit(self, expected_length: int | None = None) -> bool:
        """Publish the object. Refused (False) when a length is known — ``expected_length`` or
        the entry's ``body_length`` (Content-Length) — and the body does not have it: an
        incomplete response must not be stored as complete (RFC 9111 §3.3)."""
        if not self.active:
            return False
        expected = expected_length if expected_length is not None else self.entry.body_length
        if expected is not None and expected != self._length:
            self.abort()
            return False
        entry = replace(self.entry, body_length=self._length)
        if self._file is not None:
            try:
                self._file.flush()
                if self._store.fsync:
                    os.fsync(self._file.fileno())
                on_disk = os.fstat(self._file.fileno()).st_size
                self._file.close()
            except OSError as exc:
                log.warning("cache: not storing %s: %s", self.entry.url, exc)
                self.abort()
                return False
            self._file = None
            if on_disk != self._length:  # e.g. ENOSPC swallowed somewhere: never publish
                self.abort()
                return False
        data = b"".join(self._chunks) if self._chunks is not None else None
        self.active = False
        stored = self._store._publish(
            self.object_id, entry, data, self._tmp, self._length, self._hasher.value
        )
        self._tmp = None
        return stored


# -- the store -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreStats:
    memory_objects: int
    memory_bytes: int
    memory_limit: int
    disk_objects: int
    disk_bytes: int
    disk_limit: int
    # Estimated RAM of the index (entries, LRU bookkeeping) and its per-object average.
    index_bytes: int
    index_bytes_per_object: int

    @property
    def objects(self) -> int:
        """Distinct objects (memory objects are normally also on disk)."""
        return max(self.memory_objects, self.disk_objects)


class CacheStore:
    def __init__(
        self,
        *,
        memory_size: int,
        disk_dir: str | Path | None = None,
        disk_size: int = 0,
        max_object_size: int = 64 * MiB,
        max_memory_object_size: int = 1 * MiB,
        fsync: bool = False,
        verify_on_start: bool = False,
    ) -> None:
        """``disk_dir`` None or ``disk_size`` 0: memory only. ``verify_on_start`` re-hashes every
        body at startup (otherwise lengths are checked then, digests on every read)."""
        self._lock = threading.RLock()
        self.max_memory_object_size = min(max_memory_object_size, memory_size)
        self.max_object_size = max_object_size
        self.fsync = fsync
        # Secondary indexes hold only the exceptions: an object is found under its own id,
        # which for the common object (no Vary, shared key) is both its primary key and its
        # URL. Vary variants are listed under their primary key, and objects keyed by
        # destination or with a Vary selection under their URL (for purge and invalidation).
        self._variants: dict[str, tuple[str, ...]] = {}
        self._url_ids: dict[str, tuple[str, ...]] = {}
        self._mem = _LRU(max(memory_size, 1), self._mem_evicted)
        # Full entries of disk objects, read from their metadata by recent lookups; bounded
        # in bytes. Memory-tier objects keep their entries in the memory tier instead.
        self._loaded: LRUCache[str, CacheEntry] = LRUCache(LOADED_ENTRIES_SIZE, _entry_size)
        self.disk: _DiskTier | None = None
        if disk_dir is not None and disk_size > 0:
            self.disk = _DiskTier(Path(disk_dir), disk_size, fsync=fsync, verify=verify_on_start)
            for oid, record in self.disk.index.items():
                if not isinstance(record, int):
                    self._index_add(oid, *_names(oid, record))

    @classmethod
    def from_config(cls, cfg: CacheConfig) -> CacheStore:
        return cls(
            memory_size=cfg.memory_size,
            disk_dir=cfg.disk_dir or None,
            disk_size=cfg.disk_size,
            max_object_size=cfg.max_object_size,
            max_memory_object_size=cfg.max_memory_object_size,
        )

    # -- secondary indexes: primary key → variant ids, URL → other ids --------------------

    def _has(self, oid: str) -> bool:
        return oid in self._mem or (self.disk is not None and oid in self.disk.index)

    def _names_of(self, oid: str) -> tuple[str, str] | None:
        """(primary key, URL) of a stored object, without I/O."""
        if oid in self._mem:
            entry = Cache.__getitem__(self._mem, oid).entry  # no LRU refresh
            return entry.key, entry.url
        if self.disk is not None:
            record = self.disk.index.get(oid)
            if record is not None:
                return _names(oid, record)
        return None

    def _index_add(self, oid: str, key: str, url: str) -> None:
        for table, name in ((self._variants, key), (self._url_ids, url)):
            if name != oid:
                ids = table.get(name, ())
                if oid not in ids:
                    table[name] = (*ids, oid)

    def _index_drop(self, oid: str, key: str, url: str) -> None:
        if self._has(oid):
            return
        for table, name in ((self._variants, key), (self._url_ids, url)):
            if name != oid:
                ids = tuple(i for i in table.get(name, ()) if i != oid)
                if ids:
                    table[name] = ids
                else:
                    table.pop(name, None)

    def _ids_for(self, table: dict[str, tuple[str, ...]], name: str, which: int) -> list[str]:
        """Ids of the objects whose primary key (``which`` 0) or URL (1) is ``name``."""
        ids = list(table.get(name, ()))
        names = self._names_of(name)
        if names is not None and names[which] == name:
            ids.append(name)
        return ids

    def _mem_evicted(self, oid: str, obj: _MemObject) -> None:
        self._index_drop(oid, obj.entry.key, obj.entry.url)

    def _entry_of(self, oid: str) -> CacheEntry | None:
        """The full entry of a stored object. A disk object's comes from its metadata file
        (one small read, then kept in ``_loaded``); if that file is gone or corrupt, the
        object is dropped."""
        obj = self._mem.get(oid)
        if obj is not None:
            return obj.entry
        if self.disk is None or oid not in self.disk.index:
            return None
        entry = self._loaded.get(oid)
        if entry is None:
            entry = self.disk.read_entry(oid)
            if entry is None:
                self._drop(oid)
                return None
            self._remember(oid, entry)
        return entry

    def _remember(self, oid: str, entry: CacheEntry) -> None:
        try:
            self._loaded[oid] = entry
        except ValueError:  # larger than the whole budget: read it again next time
            self._loaded.pop(oid, None)

    # -- lookups -------------------------------------------------------------------------

    def variants(self, key: str) -> list[CacheEntry]:
        """Entries of all stored variants of a primary key, newest first. Reads the metadata
        of disk objects whose entries are not in memory."""
        with self._lock:
            ids = self._ids_for(self._variants, key, 0)
            out = [e for oid in ids if (e := self._entry_of(oid))]
        return sorted(out, key=lambda e: e.response_time, reverse=True)

    def select(self, key: str, request_headers: Headers) -> CacheEntry | None:
        """The newest variant whose Vary selection matches the request (RFC 9111 §4.1)."""
        with self._lock:
            ids = self._ids_for(self._variants, key, 0)
            if not ids:
                return None
            single = len(ids) == 1  # the common case: no list, no sorting
            if single:
                only = self._entry_of(ids[0])
            else:
                # Only variants whose id (it holds the Vary selection) can match are read:
                # not one metadata file per variant and lookup (at most MAX_VARIANTS of them).
                fields = Fields(request_headers)
                entries = [
                    e
                    for oid in ids
                    if _may_select(oid, key, fields) and (e := self._entry_of(oid)) is not None
                ]
        if single:
            if only is None or not (hot(only).vary_free or vary_matches(only, request_headers)):
                return None
            return only
        best: CacheEntry | None = None
        for entry in entries:
            if vary_matches(entry, fields) and (
                best is None or entry.response_time > best.response_time
            ):
                best = entry
        return best

    def select_hit(
        self, key: str, request_headers: Headers
    ) -> tuple[CacheEntry | None, bytes | None]:
        """:meth:`select`, plus the body when the memory tier holds the selected entry (its
        LRU positions refreshed as :meth:`open` does): one lock and one index lookup for the
        common hit — a single variant, no Vary, in memory."""
        with self._lock:
            if key not in self._variants:
                obj = self._mem.get(key)
                if obj is not None and obj.entry.key == key and hot(obj.entry).vary_free:
                    if self.disk is not None and key in self.disk.index:
                        self.disk.index.move_to_end(key)
                    return obj.entry, obj.data
        return self.select(key, request_headers), None

    def memory_body(self, entry: CacheEntry) -> bytes | None:
        """The body of ``entry`` when the memory tier holds exactly that entry — what
        :meth:`open` returns for a memory hit, without building a :class:`StoredObject`.
        None when it is not (or no longer) there: use :meth:`open`."""
        oid = object_id(entry)
        with self._lock:
            obj = self._mem.get(oid)  # also refreshes its LRU position, as open() does
            if obj is None or obj.entry is not entry:
                return None
            if self.disk is not None and oid in self.disk.index:
                self.disk.index.move_to_end(oid)
            return obj.data

    def object_ids_for_url(self, url: str) -> list[str]:
        with self._lock:
            return sorted(self._ids_for(self._url_ids, url, 1))

    def open(self, oid_or_entry: str | CacheEntry) -> StoredObject | None:
        """Open a stored object for reading; None when absent or found corrupt.

        Bodies small enough for the memory tier are read and verified here and promoted to
        memory; larger ones are returned open and verified while streaming.
        """
        oid = oid_or_entry if isinstance(oid_or_entry, str) else object_id(oid_or_entry)
        with self._lock:
            obj = self._mem.get(oid)  # also refreshes its LRU position
            if obj is not None:
                if self.disk is not None and oid in self.disk.index:
                    self.disk.index.move_to_end(oid)
                return StoredObject(oid, obj.entry, "memory", data=obj.data)
            if self.disk is None:
                return None
            entry = self._entry_of(oid)
            record = self.disk.index.get(oid)
            if entry is None or record is None:
                return None
            packed = _packed(record)
            self.disk.index.move_to_end(oid)
            try:
                f = open(self.disk.body_path(self.disk.body_name(oid, packed)), "rb")  # noqa: SIM115
            except OSError:
                self._drop(oid)
                return None
        length = _p_length(packed)
        if os.fstat(f.fileno()).st_size != length:
            f.close()
            self.delete_object(oid)
            return None
        stored = StoredObject(
            oid,
            entry,
            "disk",
            file=f,
            length=length,
            digest=_p_check(packed),
            on_corrupt=self.delete_object,
        )
        if length > self.max_memory_object_size:
            return stored
        with stored:
            try:
                data = stored.body()
            except CorruptObjectError:
                return None
        with self._lock:
            # Promote unless a newer commit or a 304 update replaced the object meanwhile:
            # both replace the loaded entry (and a commit the body's generation).
            current = self.disk.index.get(oid)
            same = current is not None and _packed(current) == packed
            if same and oid not in self._mem and Cache.get(self._loaded, oid) is entry:
                self._loaded.pop(oid, None)  # the memory tier holds it now
                self._mem_put(oid, _MemObject(entry, data))
        return StoredObject(oid, entry, "memory", data=data)

    def get(self, key: str, request_headers: Headers) -> StoredObject | None:
        """:meth:`select` + :meth:`open` in one call."""
        entry = self.select(key, request_headers)
        return self.open(entry) if entry is not None else None

    # -- writes --------------------------------------------------------------------------

    def begin(self, entry: CacheEntry) -> Writer:
        return Writer(self, entry)

    def _mem_put(self, oid: str, obj: _MemObject) -> None:
        try:
            self._mem[oid] = obj
        except ValueError:  # larger than the whole memory budget
            self._mem.pop(oid, None)
            return
        self._index_add(oid, obj.entry.key, obj.entry.url)

    def _publish(
        self,
        oid: str,
        entry: CacheEntry,
        data: bytes | None,
        tmp_body: Path | None,
        length: int,
        check: int,
    ) -> bool:
        with self._lock:
            evicted: list[tuple[str, _Record]] | None = []
            if self.disk is not None and tmp_body is not None:
                try:
                    evicted = self.disk.install(oid, tmp_body, entry, length, check)
                except OSError as exc:
                    # ENOSPC, EIO ... while moving the body or writing its metadata: install()
                    # removed the new body; the old object (if any) is untouched and served on.
                    log.warning("cache: not storing %s: %s", entry.url, exc)
                    with contextlib.suppress(OSError):
                        tmp_body.unlink()
                    return False
            old = self._mem.pop(oid, None)
            self._loaded.pop(oid, None)
            if self.disk is not None and tmp_body is not None:
                if evicted is None:  # metadata too large: not stored (and the old one gone)
                    self._drop(oid)
                    if old is not None:
                        self._index_drop(oid, old.entry.key, old.entry.url)
                    return False
                self._index_add(oid, entry.key, entry.url)
                self._trim_variants(entry.key, oid)
                for gone, record in evicted:
                    self._mem.pop(gone, None)  # the disk budget bounds the whole cache
                    self._loaded.pop(gone, None)
                    self._index_drop(gone, *_names(gone, record))
            # Memory holds a copy of what is on disk (or everything, without a disk tier); an
            # object the disk budget evicted at once is not kept in memory either.
            kept = self.disk is None or oid in self.disk.index
            if data is not None and kept:
                self._mem_put(oid, _MemObject(entry, data))
                if self.disk is None:
                    self._trim_variants(entry.key, oid)
            if kept and oid not in self._mem and self.disk is not None:
                self._remember(oid, entry)  # likely asked for soon: spare the metadata read
            if old is not None:
                self._index_drop(oid, old.entry.key, old.entry.url)
            return True

    def _trim_variants(self, key: str, keep: str) -> None:
        """Drop the oldest variants of ``key`` beyond :data:`MAX_VARIANTS` (never ``keep``,
        the one just stored). Ids are listed in the order they were first stored."""
        ids = self._ids_for(self._variants, key, 0)
        excess = len(ids) - MAX_VARIANTS
        for victim in ids:
            if excess <= 0:
                break
            if victim != keep and self._drop(victim):
                excess -= 1

    def update_entry(self, entry: CacheEntry) -> bool:
        """Replace the stored entry (headers and times after a 304), body unchanged."""
        oid = object_id(entry)
        with self._lock:
            found = False
            self._loaded.pop(oid, None)
            obj = self._mem.get(oid)
            if obj is not None:
                if obj.entry.body_length is not None:
                    entry = replace(entry, body_length=obj.entry.body_length)
                self._mem_put(oid, _MemObject(entry, obj.data))
                found = True
            if self.disk is not None and oid in self.disk.index:
                length = _p_length(_packed(self.disk.index[oid]))
                if entry.body_length != length:
                    entry = replace(entry, body_length=length)
                try:
                    written = self.disk.update_entry(oid, entry)
                except OSError as exc:  # the old metadata stays (written by rename)
                    log.warning("cache: could not update %s: %s", entry.url, exc)
                    written = False
                if written:
                    found = True
                    self._index_add(oid, entry.key, entry.url)
                    if oid not in self._mem:
                        self._remember(oid, entry)
            return found

    # -- removal -------------------------------------------------------------------------

    def _drop(self, oid: str) -> bool:
        names = self._names_of(oid)
        if names is None:
            return False
        self._mem.pop(oid, None)
        self._loaded.pop(oid, None)
        if self.disk is not None:
            self.disk.remove(oid)
        self._index_drop(oid, *names)
        return True

    def delete_object(self, oid: str) -> bool:
        with self._lock:
            return self._drop(oid)

    def delete(self, key: str) -> int:
        """Remove every variant stored under a primary key."""
        with self._lock:
            return sum(self._drop(oid) for oid in self._ids_for(self._variants, key, 0))

    def purge_url(self, url: str) -> int:
        """Remove every object for a URL: all Vary variants and destination-keyed copies
        (``url`` as :func:`~tproxy.cache.policy.request_url` normalises it)."""
        with self._lock:
            return sum(self._drop(oid) for oid in self._ids_for(self._url_ids, url, 1))

    def purge_all(self) -> int:
        with self._lock:
            ids = set(self._mem)
            if self.disk is not None:
                ids |= set(self.disk.index)
            return sum(self._drop(oid) for oid in ids)

    # -- accounting ----------------------------------------------------------------------

    def index_ram(self) -> int:
        """Estimated RAM of everything but bodies: the disk index (records, LRU order and
        secondary indexes), entries loaded from disk, and the memory tier's entries and
        slots. Kept as running sums, so this is O(1) (a metrics scrape calls it)."""
        with self._lock:
            ram = self.disk.ram if self.disk is not None else 0
            ram += int(self._loaded.currsize) + len(self._loaded) * ODICT_SLOT_BYTES
            ram += self._mem.entry_bytes + len(self._mem) * MEM_SLOT_BYTES
            return ram

    def stats(self) -> StoreStats:
        with self._lock:
            disk_objects = len(self.disk.index) if self.disk else 0
            # Memory objects are normally also on disk: count each object once.
            objects = max(len(self._mem), disk_objects)
            index = self.index_ram()
            return StoreStats(
                memory_objects=len(self._mem),
                memory_bytes=int(self._mem.currsize),
                memory_limit=int(self._mem.maxsize),
                disk_objects=disk_objects,
                disk_bytes=self.disk.bytes if self.disk else 0,
                disk_limit=self.disk.limit if self.disk else 0,
                index_bytes=index,
                index_bytes_per_object=index // objects if objects else 0,
            )


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    memory_size: int = 256 * MiB
    # Empty string or disk_size 0: memory only.
    disk_dir: str = "/var/cache/tproxy"
    disk_size: int = 1 * GiB
    max_object_size: int = 64 * MiB
    max_memory_object_size: int = 1 * MiB
    # RFC 9111 §4.2.2 heuristic freshness: fraction of (Date − Last-Modified), capped.
    heuristic_fraction: float = 0.1
    heuristic_max: float = 86400.0
    x_cache_header: bool = False
    # Share entries between clients only when Host and the intercepted destination agree;
    # false keys every entry by destination address too (see policy.cache_key).
    share_on_host_match: bool = True


def parse_cache(r: Reader) -> CacheConfig:
    d = CacheConfig()
    cfg = CacheConfig(
        enabled=r.boolean("enabled", d.enabled),
        memory_size=r.size("memory_size", d.memory_size),
        disk_dir=r.string("disk_dir", d.disk_dir),
        disk_size=r.size("disk_size", d.disk_size),
        max_object_size=r.size("max_object_size", d.max_object_size),
        max_memory_object_size=r.size("max_memory_object_size", d.max_memory_object_size),
        heuristic_fraction=r.number("heuristic_fraction", d.heuristic_fraction, 0.0, 1.0),
        heuristic_max=r.duration("heuristic_max", d.heuristic_max),
        x_cache_header=r.boolean("x_cache_header", d.x_cache_header),
        share_on_host_match=r.boolean("share_on_host_match", d.share_on_host_match),
    )
    if cfg.disk_dir and not cfg.disk_dir.startswith("/"):
        r.error("disk_dir", f"must be an absolute path; got {cfg.disk_dir!r}")
    if cfg.max_memory_object_size > cfg.memory_size:
        r.error(
            "max_memory_object_size",
            f"{cfg.max_memory_object_size} is larger than memory_size {cfg.memory_size}",
        )
    if cfg.disk_dir and cfg.disk_size > 0 and cfg.max_object_size > cfg.disk_size:
        r.error(
            "max_object_size", f"{cfg.max_object_size} is larger than disk_size {cfg.disk_size}"
        )
    r.finish()
    return cfg


register_section("cache", parse_cache)

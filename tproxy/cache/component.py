"""The HTTP cache in the daemon: lookup, serving, revalidation, storing, collapsed forwarding.

Decisions are the pure functions of :mod:`tproxy.cache.policy` (RFC 9111); bytes are stored by
:mod:`tproxy.cache.store`. This module glues them to the HTTP shell through its two hooks:

* request hook — a fresh (or allowed-stale) stored response answers the request without the
  origin (TCP_MEM_HIT / TCP_HIT, or TCP_IMS_HIT for a client's satisfied conditional); a stale
  one turns the request into a conditional request with the stored validators (§4.3.1); a miss
  for a key another client is already fetching waits for that fetch (collapsed forwarding).
* response hook — a 304 refreshes the stored response and answers from it
  (TCP_REFRESH_UNMODIFIED, §4.3.4); a storable response is copied into the store while it
  streams to the client (§3), committed only when complete; unsafe methods invalidate (§4.4).

Keys: an object is shared between clients only when the request's Host resolves to the
intercepted destination address (checked asynchronously and remembered); until then, and for a
Host that does not resolve there, the key includes the destination, so a client forging
``Host: victim.example`` towards its own server cannot poison what others get.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cachetools import TTLCache

from tproxy import http1
from tproxy.cache import policy
from tproxy.cache.policy import CacheEntry, Kind
from tproxy.cache.store import CacheConfig, CacheStore, CorruptObjectError, StoredObject
from tproxy.config import Config
from tproxy.httpconn import RESPONSE_CHECK
from tproxy.uri import media_type, normalize_host, request_origin

if TYPE_CHECKING:
    from tproxy.daemon import Daemon
    from tproxy.httpconn import ClientConnection, Exchange

log = logging.getLogger("tproxy.cache")

SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
# Host → addresses it resolves to, for the shared-key check; bounded and refreshed.
HOST_CACHE_SIZE = 10_000
HOST_CACHE_TTL = 300.0
RESOLVE_TIMEOUT = 2.0
# Request fields that a conditional request of ours replaces (RFC 9111 §4.3.1), and that make
# a response this client's own answer, so that its request neither leads nor joins a collapsed
# fetch. (If-Match and If-Unmodified-Since always go to the origin: policy.decide.)
CONDITIONALS = frozenset(
    {
        b"if-none-match",
        b"if-modified-since",
        b"if-range",
        b"range",
        b"if-match",
        b"if-unmodified-since",
    }
)
# Entries in each per-request memo (Host checks, cache keys); cleared when full.
MEMO_SIZE = 4096
# Background revalidations (RFC 5861 stale-while-revalidate) at once, and how long each may take.
MAX_REFRESHES = 64
REFRESH_TIMEOUT = 30.0
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade"}
)
# Stored fields never sent from the cache: the proxy frames the body itself.
FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})


@dataclass
class Inflight:
    """A miss being fetched; concurrent misses for the same key wait here (collapsed)."""

    key: str
    waiters: list[tuple[ClientConnection, Exchange]] = field(default_factory=list)
    done: bool = False


@dataclass
class Lookup:
    """The cache's notes on one exchange (``ex.notes["cache"]``)."""

    key: str
    url: str
    request_time: float
    client_headers: http1.Headers
    revalidating: CacheEntry | None = None
    inflight: Inflight | None = None
    # A StoreSink is copying the body: it resolves the waiters when it ends, even if the
    # client that started the fetch has left (its upstream then reads on, orphaned).
    storing: bool = False


@dataclass
class Counters:
    hits: int = 0
    mem_hits: int = 0
    ims_hits: int = 0
    misses: int = 0
    refresh_unmodified: int = 0
    refresh_modified: int = 0
    stored: int = 0
    store_aborted: int = 0
    collapsed: int = 0
    invalidated: int = 0


class HostVerifier:
    """Does the Host header name the address the client actually connected to?"""

    def __init__(self) -> None:
        self.addresses: TTLCache[str, frozenset[str]] = TTLCache(HOST_CACHE_SIZE, HOST_CACHE_TTL)
        self.pending: dict[str, asyncio.Task[None]] = {}
        # Per-request parsing is memoised: an IP-literal Host's answer never changes, and a
        # name's normalised form neither (its addresses still come from the TTL cache).
        self._literal: dict[tuple[bytes, str], bool] = {}
        self._names: dict[bytes, str | None] = {}

    def shared(self, host: bytes | None, dest_ip: str) -> bool:
        if not host:
            return False
        literal = self._literal.get((host, dest_ip))
        if literal is not None:
            return literal
        name = self._names.get(host)
        if name is None:
            name = normalize_host(host.decode("latin-1"))
            try:
                literal = ipaddress.ip_address(name) == ipaddress.ip_address(dest_ip)
            except ValueError:
                _bounded(self._names)[host] = name
            else:
                _bounded(self._literal)[(host, dest_ip)] = literal
                return literal
        known = self.addresses.get(name)
        if known is not None:
            return dest_ip in known
        if name not in self.pending and len(self.pending) < HOST_CACHE_SIZE:
            task = asyncio.get_running_loop().create_task(self._resolve(name), name="resolve")
            self.pending[name] = task
        return False

    async def _resolve(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(name, None), RESOLVE_TIMEOUT)
            found = frozenset(str(ipaddress.ip_address(info[4][0])) for info in infos)
        except (OSError, TimeoutError, ValueError, UnicodeError):
            found = frozenset()
        finally:
            self.pending.pop(name, None)
        self.addresses[name] = found


class StoreSink:
    """Copies a response body into the store; commits only a complete one."""

    def __init__(self, cache: Cache, writer: Any, lookup: Lookup) -> None:
        self.cache = cache
        self.writer = writer
        self.lookup = lookup

    def data(self, chunk: bytes) -> None:
        if self.writer.active and not self.writer.write(chunk):
            # Too large to store (or the disk failed): nothing will be stored, so the
            # collapsed waiters must not wait for the end of a body that may never come (a
            # live stream) — they go upstream on their own now.
            self.cache.resolve(self.lookup)

    def end(self, trailers: tuple[tuple[bytes, bytes], ...]) -> None:
        self.lookup.storing = False
        stored = self.writer.commit()
        if stored:
            self.cache.counters.stored += 1
        else:
            self.cache.counters.store_aborted += 1
        self.cache.resolve(self.lookup)

    def wanted(self) -> bool:
        return bool(self.writer.active)

    def abort(self) -> None:
        self.lookup.storing = False
        self.writer.abort()
        self.cache.counters.store_aborted += 1
        self.cache.resolve(self.lookup)


def _bounded(memo: dict[Any, Any]) -> dict[Any, Any]:
    """``memo``, emptied first when full: request-derived keys must not grow without bound."""
    if len(memo) >= MEMO_SIZE:
        memo.clear()
    return memo


def _without(headers: http1.Headers, names: frozenset[bytes]) -> http1.Headers:
    return [(n, v) for n, v in headers if n.lower() not in names]


class Cache:
    name = "cache"

    def __init__(self, cfg: CacheConfig, via: bool = False) -> None:
        self.cfg = cfg
        # proxy.via: hits carry Via as forwarded responses do (the stored response passed
        # through this proxy; received-protocol is what we speak upstream).
        self.own = own_fields(cfg.x_cache_header, via)
        # Opened in start(): building the component (also done by `tproxy rules show`, which
        # only needs rules_extras) must not create, scan or test-write the cache directory.
        self._store: CacheStore | None = None
        self.counters = Counters()
        self.verifier = HostVerifier()
        self.inflight: dict[str, Inflight] = {}
        self.refreshing: dict[str, asyncio.Task[None]] = {}
        self.daemon: Daemon | None = None
        # (host, target, dst ip, dst port, shared) → (cache key, URL): both are pure functions
        # of these, and a client repeats the same few requests.
        self._keys: dict[tuple[bytes | None, bytes, str, int, bool], tuple[str, str]] = {}
        self._origins: dict[tuple[bytes | None, bytes], tuple[bytes, int]] = {}

    @property
    def store(self) -> CacheStore:
        if self._store is None:
            self._store = CacheStore.from_config(self.cfg)
        return self._store

    # -- component protocol ---------------------------------------------------------------

    def rules_extras(self, cfg: Config) -> dict[str, Any]:
        return {}

    async def start(self, daemon: Daemon) -> None:
        self.daemon = daemon
        _ = self.store  # open (and check) the disk tier before any rule sends traffic here
        daemon.server.request_hooks.append(self.on_request)
        daemon.server.response_hooks.append(self.on_response)
        from tproxy import control

        ctl = control.find(daemon)
        if ctl is not None:
            ctl.register("cache-stats", self._cmd_stats)
            ctl.register("cache-purge", self._cmd_purge)

    async def reload(self, daemon: Daemon, cfg: Config) -> None:
        new = cfg.sections.get("cache")
        if isinstance(new, CacheConfig) and new != self.cfg:
            # Limits and flags apply at once; a new directory or size needs a restart.
            if (new.disk_dir, new.disk_size, new.memory_size) != (
                self.cfg.disk_dir,
                self.cfg.disk_size,
                self.cfg.memory_size,
            ):
                log.warning("cache: new sizes or directory take effect at the next restart")
            self.cfg = replace(
                new,
                disk_dir=self.cfg.disk_dir,
                disk_size=self.cfg.disk_size,
                memory_size=self.cfg.memory_size,
            )
        self.own = own_fields(self.cfg.x_cache_header, cfg.proxy.via)

    def refresh_later(
        self,
        conn: ClientConnection,
        ex: Exchange,
        entry: CacheEntry,
        conditional: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        oid = _oid(entry)
        if oid in self.refreshing or len(self.refreshing) >= MAX_REFRESHES:
            return
        dst = (str(conn.sockname[0]), int(conn.sockname[1]))
        headers = _without(ex.head.headers, CONDITIONALS | HOP_BY_HOP) + list(conditional)
        task = asyncio.get_running_loop().create_task(
            self._refresh(entry, dst, ex.head.target, headers), name=f"refresh {entry.url}"
        )
        self.refreshing[oid] = task
        task.add_done_callback(lambda _t: self.refreshing.pop(oid, None))

    async def _refresh(
        self,
        entry: CacheEntry,
        dst: tuple[str, int],
        target: bytes,
        headers: http1.Headers,
    ) -> None:
        """A conditional GET of our own (from the gateway's address) to refresh ``entry``."""
        writer: asyncio.StreamWriter | None = None
        store_writer: Any = None
        try:
            request_time = self.now()
            reader, stream = await asyncio.wait_for(
                asyncio.open_connection(dst[0], dst[1]), REFRESH_TIMEOUT
            )
            writer = stream
            lines = [b"GET " + target + b" HTTP/1.1"]
            lines += [n + b": " + v for n, v in headers]
            lines += [b"Connection: close", b"", b""]
            stream.write(b"\r\n".join(lines))
            parser = http1.ResponseParser()
            parser.expect(b"GET")
            deadline = asyncio.get_running_loop().time() + REFRESH_TIMEOUT
            while True:
                left = deadline - asyncio.get_running_loop().time()
                data = await asyncio.wait_for(reader.read(65536), max(left, 0.01))
                events = parser.feed(data) if data else parser.feed_eof()
                for event in events:
                    if isinstance(event, http1.ResponseHead):
                        now = self.now()
                        if event.status == 304:
                            if not _validates(entry, event.headers):
                                self.store.delete_object(_oid(entry))  # outdated
                                return
                            fresh = policy.refresh_entry(entry, event.headers, request_time, now)
                            self.store.update_entry(fresh)
                            self.drop_if_unshareable(fresh)
                            self.counters.refresh_unmodified += 1
                            return
                        ok, _ = policy.storable(b"GET", headers, event.status, event.headers)
                        if not ok:
                            return
                        new = policy.make_entry(
                            method=b"GET", key=entry.key, url=entry.url, status=event.status,
                            request_headers=headers, response_headers=event.headers,
                            request_time=request_time, response_time=now,
                            body_length=event.content_length, reason=event.reason,
                        )  # fmt: skip
                        store_writer = self.store.begin(new)
                    elif isinstance(event, http1.Body) and store_writer is not None:
                        store_writer.write(event.data)
                    elif isinstance(event, http1.EndOfMessage):
                        if store_writer is not None and store_writer.commit():
                            self.counters.refresh_modified += 1
                        store_writer = None
                        return
                    elif isinstance(event, http1.ProtocolError):
                        return
                if not data:
                    return
        except (OSError, TimeoutError) as exc:
            log.info("cache: background refresh of %s failed: %r", entry.url, exc)
        finally:
            if store_writer is not None:
                store_writer.abort()
            if writer is not None:
                writer.close()

    async def stop(self, daemon: Daemon) -> None:
        for task in list(self.refreshing.values()):
            task.cancel()
        for inflight in list(self.inflight.values()):
            inflight.waiters.clear()
        self.inflight.clear()

    def status(self) -> dict[str, Any]:
        st = self.store.stats()
        c = self.counters
        lookups = c.hits + c.mem_hits + c.ims_hits + c.misses + c.refresh_unmodified
        lookups += c.refresh_modified
        served = c.hits + c.mem_hits + c.ims_hits + c.refresh_unmodified
        return {
            "objects": st.objects,
            "memory_objects": st.memory_objects,
            "memory_bytes": st.memory_bytes,
            "disk_objects": st.disk_objects,
            "disk_bytes": st.disk_bytes,
            "index_bytes_per_object": st.index_bytes_per_object,
            "hits": c.hits + c.mem_hits + c.ims_hits,
            "mem_hits": c.mem_hits,
            "misses": c.misses,
            "refresh_unmodified": c.refresh_unmodified,
            "refresh_modified": c.refresh_modified,
            "stored": c.stored,
            "store_aborted": c.store_aborted,
            "collapsed": c.collapsed,
            "invalidated": c.invalidated,
            "hit_ratio": round(served / lookups, 4) if lookups else 0.0,
        }

    async def _cmd_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _cmd_purge(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("all"):
            return {"purged": self.store.purge_all()}
        url = str(args.get("url", ""))
        if not url:
            raise ValueError("cache-purge needs a url or all")
        return {"purged": self.purge(url)}

    def purge(self, url: str) -> int:
        norm = policy.request_url("http", None, url) or url
        return self.store.purge_url(norm)

    # -- requests -------------------------------------------------------------------------

    def now(self) -> float:
        return time.time()

    def on_request(self, conn: ClientConnection, ex: Exchange) -> bool:
        head = ex.head
        method = head.method
        if method not in (b"GET", b"HEAD"):
            return False
        if head.upgrade:
            return False
        sockname = conn.sockname
        dst_ip, dst_port = str(sockname[0]), int(sockname[1])
        shared = self.cfg.share_on_host_match and self.shares(
            head.host, head.target, dst_ip, dst_port
        )
        key, url = self.key_of(head.host, head.target, dst_ip, dst_port, shared)
        entry, body = self.store.select_hit(key, head.headers)
        if shared and entry is None:
            # Stored before the Host was verified (or while it did not resolve here): that copy
            # came from this very destination, so it is safe for this client as well.
            dest_key = self.key_of(head.host, head.target, dst_ip, dst_port, False)[0]
            dest_entry, dest_body = self.store.select_hit(dest_key, head.headers)
            if dest_entry is not None:
                key, entry, body = dest_key, dest_entry, dest_body
        return self.lookup(conn, ex, key, url, entry, collapse=True, body=body)

    def shares(self, host: bytes | None, target: bytes, dst_ip: str, dst_port: int) -> bool:
        """Whether a response may be shared under its URL: the host *and port* of the URI the
        key is built from name the address the client really connected to. The URI's
        authority is absolute-form's when the request has one (RFC 9112 §3.2.2; it wins over
        Host in the key, so checking Host would let `GET http://victim/ HTTP/1.1` with
        `Host: <own server>` plant a response under victim's URL), and its port counts: a
        name that resolves here says nothing of which service on that address answered."""
        memo_key = (host, target)
        origin = self._origins.get(memo_key)
        if origin is None:
            name, port = request_origin("http", host, target)
            origin = (name.encode("latin-1"), port)
            _bounded(self._origins)[memo_key] = origin
        return origin[1] == dst_port and self.verifier.shared(origin[0], dst_ip)

    def key_of(
        self, host: bytes | None, target: bytes, dst_ip: str, dst_port: int, shared: bool
    ) -> tuple[str, str]:
        """The cache key and URL of a request (memoised :func:`policy.cache_key`)."""
        memo_key = (host, target, dst_ip, dst_port, shared)
        found = self._keys.get(memo_key)
        if found is None:
            key = policy.cache_key("http", host, dst_ip, dst_port, target, shared)
            found = (key, policy.request_url("http", host, target) or key)
            _bounded(self._keys)[memo_key] = found
        return found

    def lookup(
        self,
        conn: ClientConnection,
        ex: Exchange,
        key: str,
        url: str,
        entry: CacheEntry | None,
        collapse: bool,
        body: bytes | None = None,
    ) -> bool:
        """Answer, hold or forward ``ex`` given the stored ``entry`` selected for ``key``
        (and its ``body`` when the memory tier handed it over with the entry)."""
        head = ex.head
        now = self.now()
        plain = entry is not None and policy.request_is_plain(head.headers)
        if plain and entry is not None:
            # The common hit: no request directives, conditionals or Range (see plain_fresh).
            cfg = self.cfg
            fresh = policy.plain_fresh(
                head.method,
                head.headers,
                entry,
                now,
                heuristic_fraction=cfg.heuristic_fraction,
                heuristic_max=cfg.heuristic_max,
            )
            if fresh is not None and self.serve_plain(conn, ex, entry, fresh[0], body):
                return True
        # The fast path above was tried already: the full rules (the same answer, RFC 9111 §4).
        decision = policy.decide(
            head.method,
            head.headers,
            entry,
            now,
            heuristic_fraction=self.cfg.heuristic_fraction,
            heuristic_max=self.cfg.heuristic_max,
        )
        if entry is not None and decision.kind in (Kind.FRESH, Kind.STALE_OK):
            if decision.background_revalidate:
                # RFC 5861 §3: serve the stale response now, revalidate behind the client.
                self.refresh_later(conn, ex, entry, decision.conditional)
            if plain and self.serve_plain(conn, ex, entry, decision.age, None):
                return True
            if self.serve(conn, ex, entry, decision.age, None):
                return True
            entry = None  # gone or corrupt meanwhile: a miss
            decision = policy.decide(head.method, head.headers, None, now)
        if decision.kind is Kind.GATEWAY_TIMEOUT:
            # RFC 9111 §5.2.1.7: only-if-cached and nothing usable stored.
            from tproxy.httpconn import error_response

            data = error_response(
                504,
                "The response is not in the cache (only-if-cached).",
                head_only=head.method == b"HEAD",
            )
            conn.respond_local(ex, data, 504, "TCP_MISS")
            return True
        lookup = Lookup(key, url, now, head.headers)
        if decision.kind is Kind.REVALIDATE and entry is not None:
            lookup.revalidating = entry
            headers = _without(head.headers, CONDITIONALS) + list(decision.conditional)
            ex.head = replace(head, headers=headers)
        elif head.method == b"GET" and collapse and not _has(head.headers, CONDITIONALS):
            inflight = self.inflight.get(key)
            if inflight is not None and not inflight.done:
                # Collapsed forwarding: one upstream request for concurrent misses.
                self.counters.collapsed += 1
                inflight.waiters.append((conn, ex))
                ex.notes["cache"] = lookup
                return True
            lookup.inflight = self.inflight[key] = Inflight(key)
            ex.on_finish = self.finished
        ex.notes["cache"] = lookup
        self.counters.misses += 1
        return False

    def resolve(self, lookup: Lookup) -> None:
        """The leading fetch of a key ended (stored or not): let its waiters go on."""
        inflight = lookup.inflight
        if inflight is None or inflight.done:
            return
        inflight.done = True
        if self.inflight.get(inflight.key) is inflight:
            del self.inflight[inflight.key]
        waiters, inflight.waiters = inflight.waiters, []
        for conn, ex in waiters:
            if conn.closed or conn.exchange is not ex:
                continue
            try:
                # Now a hit, usually; otherwise the waiter forwards on its own.
                entry = self.store.select(lookup.key, ex.head.headers)
                if not self.lookup(conn, ex, lookup.key, lookup.url, entry, collapse=False):
                    conn.forward_request(ex)
            except Exception:
                log.exception("serving a collapsed request failed")
                conn.abort()

    def finished(self, ex: Exchange) -> None:
        lookup = ex.notes.get("cache")
        if isinstance(lookup, Lookup) and not lookup.storing:
            self.resolve(lookup)

    # -- responses ------------------------------------------------------------------------

    def on_response(self, conn: ClientConnection, ex: Exchange, resp: http1.ResponseHead) -> bool:
        method = ex.head.method
        if method not in SAFE_METHODS:
            # RFC 9111 §4.4: a non-error response to an unsafe method invalidates the target
            # and same-origin Location / Content-Location.
            for url in policy.invalidate_uris(method, resp.status, ex.url, resp.headers):
                self.counters.invalidated += self.store.purge_url(url)
            return False
        lookup = ex.notes.get("cache")
        if not isinstance(lookup, Lookup):
            return False
        now = self.now()
        stale = lookup.revalidating
        if stale is not None:
            if resp.status == 304 and not _validates(stale, resp.headers):
                return self.refetch(conn, ex, lookup, stale)
            if resp.status == 304:
                refreshed = policy.refresh_entry(stale, resp.headers, lookup.request_time, now)
                self.counters.refresh_unmodified += 1
                ex.head = replace(ex.head, headers=lookup.client_headers)
                age = policy.current_age(refreshed, now)
                # Stored first, because serve() answers from the store's copy; dropped after it
                # when the update made it unshareable (a disk object is open by then, and
                # unlinking it leaves this answer whole).
                self.store.update_entry(refreshed)
                served = self.serve(conn, ex, refreshed, age, None, result="TCP_REFRESH_UNMODIFIED")
                self.drop_if_unshareable(refreshed)
                return served
            if resp.status >= 500 and policy.stale_if_error_ok(
                stale, lookup.client_headers, resp.status, now
            ):
                ex.head = replace(ex.head, headers=lookup.client_headers)
                age = policy.current_age(stale, now)
                if self.serve(conn, ex, stale, age, None, result="TCP_REFRESH_FAIL_OLD"):
                    return True
            ex.result = "TCP_REFRESH_MODIFIED"
            self.counters.refresh_modified += 1
        if method == b"HEAD":
            self.freshen_from_head(lookup, resp)
            return False
        ok, reason = policy.storable(method, lookup.client_headers, resp.status, resp.headers)
        if not ok:
            log.debug("not storing %s: %s", lookup.url, reason)
            if stale is not None and resp.status < 500:
                # RFC 9111 §4.3.3: a full response to our conditional request says the stored
                # one is not suitable; kept, it would only be revalidated again and again. A
                # 5xx says nothing about it (it may still serve under stale-if-error).
                self.store.delete_object(_oid(stale))
            self.resolve(lookup)
            return False
        entry = policy.make_entry(
            method=method,
            key=lookup.key,
            url=lookup.url,
            status=resp.status,
            request_headers=lookup.client_headers,
            response_headers=resp.headers,
            request_time=lookup.request_time,
            response_time=now,
            body_length=resp.content_length,
            reason=resp.reason,
        )
        writer = self.store.begin(entry)
        if not writer.active:
            self.resolve(lookup)
            return False
        ex.sink = StoreSink(self, writer, lookup)
        lookup.storing = True
        if self.cfg.x_cache_header:
            ex.extra_headers.append((b"X-Cache", b"MISS"))
        return False

    def refetch(
        self, conn: ClientConnection, ex: Exchange, lookup: Lookup, stale: CacheEntry
    ) -> bool:
        """The origin answered our conditional request with a 304 for a representation other
        than the stored one (RFC 9111 §4.3.4 selects nothing to update): the stored response
        is outdated, and the client's own request goes upstream again, unconditional as it
        came. Serving the stored body under the 304's new validators would hand out the
        wrong content."""
        self.store.delete_object(_oid(stale))
        lookup.revalidating = None
        ex.head = replace(ex.head, headers=lookup.client_headers)
        self.counters.refresh_modified += 1
        if not ex.retryable or not ex.request_done or ex.response_started:
            # A request body cannot be sent twice (and a GET with one is rare): give up.
            conn.fail_exchange(ex, 502, "The origin validated another version of the object.")
            return True
        ex.retryable = False  # once
        conn.detach_upstream(ex)  # the 304 has no body: that connection can be reused
        ex.response_head = None
        ex.status = 0
        ex.ctype = None
        conn.forward_request(ex)
        return True

    def freshen_from_head(self, lookup: Lookup, resp: http1.ResponseHead) -> None:
        """RFC 9111 §4.3.5: a HEAD response updates the stored GET, or invalidates it."""
        entry = self.store.select(lookup.key, lookup.client_headers)
        if entry is None or resp.status != 200:
            return
        headers = policy.freshen_from_head(list(entry.headers), resp.headers)
        if headers is None:
            self.store.delete_object(_oid(entry))
        else:
            fresh = replace(entry, headers=tuple(headers))
            self.store.update_entry(fresh)
            self.drop_if_unshareable(fresh)

    @staticmethod
    def refused(conn: ClientConnection, ex: Exchange, entry: CacheEntry, length: int) -> bool:
        """Whether a hook that judges response heads (RESPONSE_CHECK: the filter's mime and
        size rules) refuses this stored response, and has answered the client itself. A hit
        must meet the rules a forwarded response meets, or a video stored outside a rule's
        window (or for another group) would be served inside it."""
        check = ex.notes.get(RESPONSE_CHECK)
        return check is not None and bool(check(conn, ex, entry.status, entry.headers, length))

    def drop_if_unshareable(self, fresh: CacheEntry) -> None:
        """After a 304 or a HEAD updated a stored response (RFC 9111 §4.3.4, §4.3.5): drop it
        if it is no longer storable. The update replaces the stored fields, so a 304 that says
        `private` or `no-store` (or carries a per-user field under it) would otherwise turn a
        shared copy into one user's response served to everybody (§3, §5.2.2.5, §5.2.2.7);
        such an update answers its own request only."""
        # The response's own fields decide (no-store, private, Set-Cookie...), not this
        # client's request: one sending Authorization or no-store must not drop a shared copy.
        ok, reason = policy.storable(b"GET", [], fresh.status, list(fresh.headers))
        if not ok:
            log.debug("dropping %s after its update: %s", fresh.url, reason)
            self.store.delete_object(_oid(fresh))

    # -- serving from the store -----------------------------------------------------------

    def serve_plain(
        self,
        conn: ClientConnection,
        ex: Exchange,
        entry: CacheEntry,
        age: float,
        body: bytes | None,
    ) -> bool:
        """:meth:`serve` for a request without conditionals or Range
        (:func:`policy.request_is_plain`): the same bytes, from a head serialised once per
        entry with only Age filled in. ``body`` is the memory tier's copy when the lookup
        handed it over; otherwise the object is looked up here. False: it is gone (a miss)."""
        obj: StoredObject | None = None
        if body is None:
            body = self.store.memory_body(entry)
            if body is None:
                obj = self.store.open(entry)
                if obj is None:
                    return False
                entry = obj.entry
                if obj.tier == "memory":  # a small disk object, now promoted
                    body, obj = obj.body(), None
        head = ex.head
        keep = head.keep_alive and not conn.server.draining
        length = len(body) if body is not None else obj.length if obj is not None else 0
        if self.refused(conn, ex, entry, length):
            if obj is not None:
                obj.close()
            return True
        memo = policy.hot(entry).memo
        shape = (self.own, keep, head.version == b"1.0", length)
        parts = memo.get(shape)
        if not isinstance(parts, _HitHead):
            parts = _HitHead.build(entry, shape)
            memo[shape] = parts
        ex.client_keep_alive = keep
        ex.content_type = parts.content_type
        data = parts.prefix + policy.age_value(age) + parts.suffix
        status = entry.status
        if obj is None:
            self.counters.mem_hits += 1
            if head.method != b"HEAD" and body:
                data += body
            conn.respond_local(ex, data, status, "TCP_MEM_HIT")
            return True
        self.counters.hits += 1
        if head.method == b"HEAD" or length == 0:
            obj.close()
            conn.respond_local(ex, data, status, "TCP_HIT")
            return True
        # The whole body, whatever the status: iter_chunks checks it against its CRC-32.
        conn.stream_local(ex, data, _closing(obj, obj.iter_chunks()), status, "TCP_HIT")
        return True

    def serve(
        self,
        conn: ClientConnection,
        ex: Exchange,
        entry: CacheEntry,
        age: float,
        obj: StoredObject | None,
        result: str | None = None,
    ) -> bool:
        """Answer ``ex`` from a stored response; False if it vanished (then it is a miss)."""
        obj = obj or self.store.open(entry)
        if obj is None:
            return False
        entry = obj.entry
        if self.refused(conn, ex, entry, obj.length):
            obj.close()
            return True
        head = ex.head
        method = head.method
        tier_result = "TCP_MEM_HIT" if obj.tier == "memory" else "TCP_HIT"
        own = self.own
        age_bytes = policy.age_value(age)
        fields = _hit_fields(entry)
        cond = policy.evaluate_conditionals(method, head.headers, list(entry.headers), entry.status)
        keep = head.keep_alive and not conn.server.draining
        ex.client_keep_alive = keep
        ex.content_type = _content_type(entry)

        def hit_head(
            status: int,
            reason: bytes,
            fields: policy.Headers,
            extra: policy.Headers,
            length: int | None,
        ) -> bytes:
            parts = _hit_head(status, reason, fields, own, extra, length, head.version, keep)
            return parts[0] + age_bytes + parts[1]

        if cond is not None:
            obj.close()
            status = cond
            if status == 304:
                # RFC 9110 §15.4.5: the stored response's validator and caching fields.
                not_modified = policy.not_modified_headers(entry.headers)
                data = hit_head(304, b"Not Modified", not_modified, (), None)
            else:
                data = _head(status, b"Precondition Failed", [], 0, head.version, keep)
            self.counters.ims_hits += 1
            conn.respond_local(ex, data, status, result or "TCP_IMS_HIT")
            return True
        length = obj.length
        plan = policy.plan_range(method, head.headers, list(entry.headers), length, entry.status)
        status, reason = entry.status, entry.reason or b"OK"
        start, end = 0, length - 1
        extra: policy.Headers = ()
        if plan.status == 206 and plan.ranges:
            status, reason = 206, b"Partial Content"
            start, end = plan.ranges[0]
            extra = ((b"Content-Range", plan.content_range or b""),)
        elif plan.status == 416:
            obj.close()
            fields = [(n, v) for n, v in fields if n.lower() != b"content-type"]
            extra = ((b"Content-Range", plan.content_range or b"bytes */%d" % length),)
            data = hit_head(416, b"Range Not Satisfiable", fields, extra, 0)
            conn.respond_local(ex, data, 416, result or tier_result)
            return True
        body_len = end - start + 1 if length else 0
        data_head = hit_head(status, reason, fields, extra, body_len)
        if obj.tier == "memory" and result is None:
            self.counters.mem_hits += 1
        elif result is None:
            self.counters.hits += 1
        final = result or tier_result
        if method == b"HEAD" or body_len == 0:
            obj.close()
            conn.respond_local(ex, data_head, status, final)
            return True
        if obj.tier == "memory" and status != 206:
            body = obj.body()
            conn.respond_local(ex, data_head + body, status, final)
            return True
        # A full body of any status is read through iter_chunks, which checks its CRC-32; only
        # a range (206) cannot be checked.
        chunks = obj.iter_chunks() if status != 206 else obj.iter_range(start, end)
        conn.stream_local(ex, data_head, _closing(obj, chunks), status, final)
        return True


@dataclass(frozen=True, slots=True)
class _HitHead:
    """A stored response's head as serve() writes it, split around the Age value."""

    prefix: bytes  # status line, stored fields (_hit_fields), "Age: "
    suffix: bytes  # "\r\n" after Age, X-Cache, Content-Length, Connection, blank line
    content_type: str

    @classmethod
    def build(cls, entry: CacheEntry, shape: tuple[policy.Headers, bool, bool, int]) -> _HitHead:
        own, keep, http10, length = shape
        prefix, suffix = _hit_head(
            entry.status, entry.reason or b"OK", _hit_fields(entry), own, (), length,
            b"1.0" if http10 else b"1.1", keep,
        )  # fmt: skip
        return cls(prefix, suffix, _content_type(entry))


def own_fields(x_cache: bool, via: bool) -> tuple[tuple[bytes, bytes], ...]:
    """The fields a hit carries after Age: X-Cache (cache.x_cache_header), Via (proxy.via)."""
    fields: list[tuple[bytes, bytes]] = []
    if x_cache:
        fields.append((b"X-Cache", b"HIT"))
    if via:
        fields.append((b"Via", http1.via_value(b"1.1")))
    return tuple(fields)


def _oid(entry: CacheEntry) -> str:
    from tproxy.cache.store import object_id

    return object_id(entry)


def _validates(entry: CacheEntry, not_modified: http1.Headers) -> bool:
    """Does a 304 to our conditional request (made from ``entry``'s validators) update
    ``entry``? RFC 9111 §4.3.4: its ETag / Last-Modified must select it. A 304 without any
    validator is taken as answering the validators we sent (origins that omit ETag in a 304,
    against RFC 9110 §15.4.5, are common); only one naming another representation is not."""
    f = policy.Fields(not_modified)
    if b"etag" not in f and b"last-modified" not in f:
        return True
    return bool(policy.select_for_304([entry], not_modified))


def _has(headers: http1.Headers, names: frozenset[bytes]) -> bool:
    return any(n.lower() in names for n, _ in headers)


def _content_type(entry: CacheEntry) -> str:
    return media_type(entry.fields.one(b"content-type")) or "-"


def _hit_fields(entry: CacheEntry) -> list[policy.Header]:
    """:func:`policy.hit_fields` without the stored framing fields: the proxy frames the body
    it sends itself (RFC 9112 §6; Content-Length and Connection come from :func:`_head_end`)."""
    return [(n, v) for n, v in policy.hit_fields(entry) if n.lower() not in FRAMING]


def _hit_head(
    status: int,
    reason: bytes,
    fields: policy.Headers,
    own: policy.Headers,
    extra: policy.Headers,
    length: int | None,
    client_version: bytes,
    keep_alive: bool,
) -> tuple[bytes, bytes]:
    """A head the cache answers with, split around the Age value: the status line, ``fields``
    and ``"Age: "``; then the end of that line, ``own`` (X-Cache, Via: :func:`own_fields`),
    ``extra`` and the framing.

    Stored fields (:func:`policy.hit_fields`), Age, X-Cache is the order; the Age value
    (RFC 9111 §5.1) goes between the parts. serve() joins them for each hit, serve_plain()
    keeps them per entry and shape (:class:`_HitHead`)."""
    prefix = _head_start(status, reason, fields) + b"Age: "
    if status == 204:
        length = None  # RFC 9110 §8.6: no Content-Length in a 204; it has no content anyway
    after = [*own, *extra]
    suffix = b"\r\n" + _head_start(None, b"", after) + _head_end(length, client_version, keep_alive)
    return prefix, suffix


def _head(
    status: int,
    reason: bytes,
    fields: http1.Headers,
    length: int | None,
    client_version: bytes,
    keep_alive: bool,
) -> bytes:
    return _head_start(status, reason, fields) + _head_end(length, client_version, keep_alive)


def _head_start(status: int | None, reason: bytes, fields: policy.Headers) -> bytes:
    """The status line (None: none) and ``fields``."""
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)] if status is not None else []
    out.extend(n + b": " + v + b"\r\n" for n, v in fields)
    return b"".join(out)


def _head_end(length: int | None, client_version: bytes, keep_alive: bool) -> bytes:
    """The framing fields the proxy adds, and the blank line ending the head."""
    out = []
    if length is not None:
        out.append(b"Content-Length: %d\r\n" % length)
    if not keep_alive:
        out.append(b"Connection: close\r\n")
    elif client_version == b"1.0":
        out.append(b"Connection: keep-alive\r\n")  # RFC 9112 §9.3: opt-in for HTTP/1.0
    out.append(b"\r\n")
    return b"".join(out)


def _closing(obj: StoredObject, chunks: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from chunks
    except CorruptObjectError:
        log.warning("cache: %s was corrupt on disk and has been dropped", obj.entry.url)
        raise
    finally:
        obj.close()


def create(cfg: Config) -> Cache | None:
    section = cfg.sections.get("cache")
    if not isinstance(section, CacheConfig) or not section.enabled:
        return None
    return Cache(section, via=cfg.proxy.via)

"""Compiled filter policy and verdicts for requests, responses and TLS SNI.

Semantics (the operator's contract):

* **Group selection** — the first ``[[filter.group]]`` in config order whose CIDRs contain the
  client address *or* whose MACs include the client MAC; else the group named ``default`` if
  configured; else an implicit ``default`` group using the global default action. First match
  in config order (not most specific) so the order in the file is the one thing to read; put
  narrow groups first.
* **Rules** — a group's rules are the ``[[filter.rule]]`` entries naming it (or ``"*"``), in
  config order. A rule applies when its window (if any) is active and *all* its matchers
  match; a list matcher matches when any element does. The first applying rule decides; else
  the group's ``default``; else the global ``default``.
* **Request vs response** — ``mime`` and ``max_response_size`` need the response head. While
  the request is decided, such a rule whose request-side matchers match is *pending*. If a
  pending rule could reverse the request's decision, the request verdict is a tentative
  ``allow`` with ``final=False`` and :meth:`Policy.response_verdict` decides with the full
  information. ``extensions`` are matched on the URL path, so they decide at request time.
* **SNI** — for HTTPS only the server name is visible (nothing is decrypted), so only rules
  whose matchers are all among ``domains``, ``categories`` (their ``domains`` lists; ``urls``
  need a path) and ``window`` are considered; rules with URL, method, User-Agent, MIME,
  extension or size matchers are skipped. A flow without SNI gets ``sni_default`` unless the
  client's group can never deny anything by SNI. A ClientHello with an ECH extension is
  decided by its outer name: browsers send GREASE ECH everywhere, so ECH alone says nothing;
  real ECH is stopped by denying the providers' public names (``cloudflare-ech.com``).
"""

from __future__ import annotations

import html
import ipaddress
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tproxy.filter.categories import Categories
from tproxy.filter.domains import DomainSet
from tproxy.filter.model import (
    ALL_GROUPS,
    DAYS,
    DEFAULT_GROUP,
    Action,
    FilterConfig,
    GroupConfig,
    RuleConfig,
    WindowConfig,
    compile_re2,
)
from tproxy.filter.urlnorm import match_forms, match_host
from tproxy.filter.urlnorm import match_url as match_url
from tproxy.uri import media_type as media_type
from tproxy.uri import split_url as split_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_BLOCK_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Access blocked</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:sans-serif;max-width:40em;margin:4em auto;padding:0 1em;color:#222}
code{background:#eee;padding:.1em .3em;word-break:break-all}</style></head>
<body>
<h1>Access to this page is blocked</h1>
<p>The network's content filter blocked <code>$url</code>.</p>
<p>Reason: $reason<br>Rule: <code>$rule</code><br>Client group: <code>$group</code></p>
<p>If you think this is a mistake, contact the network administrator.</p>
</body>
</html>
"""


@dataclass(frozen=True)
class RequestInfo:
    client_ip: str | IPAddress
    client_mac: str | None
    method: str
    host: str
    url: str  # absolute http URL (RFC 9112 §3.2.2), as rebuilt by the proxy
    user_agent: str | None
    now: datetime
    # The address the client really connected to (the proxy always forwards there): address
    # entries in a rule's `domains` match it as well as the URL's host.
    dest_ip: str | None = None


@dataclass(frozen=True)
class Verdict:
    action: Action
    group: str
    rule: str  # "filter.rule[2]", "default", "filter.group[1].default", "sni_default", …
    reason: str
    category: str | None = None
    # False: a response-side rule may still change the outcome; call response_verdict.
    final: bool = True

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


# -- compiled structures ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    cfg: RuleConfig
    window: WindowConfig | None
    domains: DomainSet | None
    url_prefix: tuple[str, ...]
    url_regex: Any  # re2 pattern or None
    categories: frozenset[str]
    methods: frozenset[str]
    user_agent: Any  # re2 pattern or None
    mime_exact: frozenset[str]
    mime_major: frozenset[str]
    extensions: tuple[str, ...]
    max_size: int | None

    @property
    def key(self) -> str:
        return self.cfg.key

    @property
    def action(self) -> Action:
        return self.cfg.action


@dataclass(frozen=True)
class _Group:
    name: str
    key: str
    nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    macs: frozenset[str]
    default: Action
    default_key: str  # where the default comes from, for verdicts
    rules: tuple[_Rule, ...]
    sni_rules: tuple[_Rule, ...]

    @property
    def sni_can_deny(self) -> bool:
        return self.default == "deny" or any(r.action == "deny" for r in self.sni_rules)


class _Req:
    """Per-call view of a request, computing normalised parts once and categories lazily."""

    __slots__ = (
        "_categories",
        "_cats",
        "dest",
        "host",
        "method",
        "path",
        "path_only",
        "ua",
        "url",
    )

    def __init__(
        self,
        categories: Categories,
        host: str,
        url: str | None,
        path: str | None,
        method: str | None,
        ua: str | None,
        dest: str | None = None,
    ) -> None:
        self._categories = categories
        self._cats: dict[str, str] | None = None
        self.host = host
        # The destination address when it is not what the host already names: a Host (or SNI)
        # of an allowed site sent to a denied site's address must meet that address's entries.
        self.dest = dest if dest and dest != host else None
        self.url = url
        self.path = path
        self.path_only = path.split("?", 1)[0].lower() if path is not None else None
        self.method = method
        self.ua = ua

    @property
    def cats(self) -> dict[str, str]:
        if self._cats is None:
            # Not the destination address: category lists carry addresses of shared hosts and
            # CDNs, and one such entry would deny every name served there. Only the admin's
            # own `domains` entries meet the address (_request_match).
            self._cats = self._categories.match(self.host, self.path)
        return self._cats


def _local_clock(now: datetime) -> tuple[int, int]:
    """(weekday, minute of day) in local time; naive datetimes are taken as local already."""
    if now.tzinfo is not None:
        now = now.astimezone()
    return now.weekday(), now.hour * 60 + now.minute


def _compile_rule(cfg: RuleConfig, windows: dict[str, WindowConfig]) -> _Rule:
    regex = None
    if cfg.url_regex:
        # One alternation = one linear-time scan of the URL, however many patterns there are.
        regex = compile_re2("|".join(f"(?:{p})" for p in cfg.url_regex))
    return _Rule(
        cfg=cfg,
        window=windows.get(cfg.window) if cfg.window else None,
        domains=DomainSet.from_patterns(cfg.domains) if cfg.domains else None,
        url_prefix=cfg.url_prefix,
        url_regex=regex,
        categories=frozenset(cfg.categories),
        methods=frozenset(cfg.methods),
        user_agent=compile_re2(cfg.user_agent) if cfg.user_agent is not None else None,
        mime_exact=frozenset(m for m in cfg.mime if not m.endswith("/*")),
        mime_major=frozenset(m[:-2] for m in cfg.mime if m.endswith("/*")),
        extensions=cfg.extensions,
        max_size=cfg.max_response_size,
    )


# -- matching ---------------------------------------------------------------------------------


def _strictest(verdicts: list[Verdict]) -> Verdict:
    """One verdict for the readings of a URL (urlnorm.match_forms): a denial if any reading
    is denied; else an allowance that still waits for the response if any does."""
    chosen = verdicts[0]
    for v in verdicts[1:]:
        if (chosen.allowed and not v.allowed) or (chosen.allowed and chosen.final and not v.final):
            chosen = v
    return chosen


Trace = Callable[[str], None]


def _request_match(rule: _Rule, req: _Req) -> tuple[bool, str, str | None]:
    """(matched, why, category) for the request-side matchers of one rule."""
    why: list[str] = []
    category: str | None = None
    if rule.domains is not None:
        hit = rule.domains.match(req.host)
        if hit is None and req.dest is not None:
            hit = rule.domains.match(req.dest)
        if hit is None:
            return False, f"host {req.host} not in domains", None
        why.append(f"domain {hit}")
    if rule.categories:
        cats = req.cats
        found = sorted(c for c in rule.categories if c in cats)
        if not found:
            return False, f"host not in categories {sorted(rule.categories)}", None
        category = found[0]
        why.append(f"category:{category} ({cats[category]})")
    if rule.methods:
        if req.method is None or req.method.upper() not in rule.methods:
            return False, f"method {req.method} not in {sorted(rule.methods)}", None
        why.append(f"method {req.method}")
    if rule.url_prefix:
        if req.url is None:
            return False, "no URL (SNI)", None
        url = req.url
        hit_prefix = next((p for p in rule.url_prefix if url.startswith(p)), None)
        if hit_prefix is None:
            return False, "URL matches no url_prefix", None
        why.append(f"url_prefix {hit_prefix}")
    if rule.url_regex is not None:
        if req.url is None or rule.url_regex.search(req.url) is None:
            return False, "URL matches no url_regex", None
        why.append("url_regex")
    if rule.user_agent is not None:
        if req.ua is None or rule.user_agent.search(req.ua) is None:
            return False, "User-Agent does not match", None
        why.append("user_agent")
    if rule.extensions:
        p = req.path_only
        hit_ext = next((e for e in rule.extensions if p is not None and p.endswith(e)), None)
        if hit_ext is None:
            return False, "URL path has none of the extensions", None
        why.append(f"extension {hit_ext}")
    return True, ", ".join(why) or "matches everything", category


@dataclass(frozen=True)
class _Response:
    mime: str | None
    length: int | None


def _response_match(rule: _Rule, resp: _Response) -> tuple[bool, str]:
    why: list[str] = []
    if rule.mime_exact or rule.mime_major:
        m = resp.mime
        if m is None:
            return False, "no Content-Type"
        if m not in rule.mime_exact and m.split("/", 1)[0] not in rule.mime_major:
            return False, f"Content-Type {m} not matched"
        why.append(f"Content-Type {m}")
    if rule.max_size is not None:
        # An unknown length (chunked, close-delimited) is not "larger than": the proxy would
        # have to count while streaming; it matches only a declared Content-Length.
        if resp.length is None or resp.length <= rule.max_size:
            return False, f"size {resp.length} within {rule.max_size}"
        why.append(f"Content-Length {resp.length} > {rule.max_size}")
    return True, ", ".join(why)


# -- the policy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    config: FilterConfig
    categories: Categories
    groups: tuple[_Group, ...]
    fallback: _Group
    windows: tuple[WindowConfig, ...]
    block_template: str
    quic_reject: bool
    https: bool
    # Problems found while compiling (e.g. a category with no loaded entries): log them.
    warnings: tuple[str, ...] = field(default=())

    @classmethod
    def compile(cls, cfg: FilterConfig, categories: Categories | None = None) -> Policy:
        cats = categories if categories is not None else Categories.empty()
        windows = {w.name: w for w in cfg.windows}
        rules = [_compile_rule(r, windows) for r in cfg.rules]
        warnings: list[str] = []
        for rule in rules:
            for cat in rule.cfg.categories:
                if cat not in cats.names:
                    warnings.append(f"{rule.key}: category {cat!r} is not loaded; matches nothing")

        def build(g: GroupConfig) -> _Group:
            mine = tuple(r for r in rules if r.cfg.group in (g.name, ALL_GROUPS))
            default = g.default if g.default is not None else cfg.default
            return _Group(
                name=g.name,
                key=g.key,
                nets=g.cidrs,
                macs=g.macs,
                default=default,
                default_key=f"{g.key}.default" if g.default is not None else "default",
                rules=mine,
                sni_rules=tuple(r for r in mine if r.cfg.sni_applicable),
            )

        groups = tuple(build(g) for g in cfg.groups if g.name != DEFAULT_GROUP)
        named_default = next((g for g in cfg.groups if g.name == DEFAULT_GROUP), None)
        fallback = build(named_default or GroupConfig(DEFAULT_GROUP, key="filter"))
        # "auto": reject QUIC (UDP 443) when anything could be denied by SNI, since browsers
        # speaking HTTP/3 would otherwise bypass the TCP/SNI check; they fall back to TCP.
        any_sni_deny = any(g.sni_can_deny for g in (*groups, fallback)) or cfg.sni_default == "deny"
        quic = {"true": True, "false": False}.get(cfg.quic_reject, cfg.https and any_sni_deny)
        return cls(
            config=cfg,
            categories=cats,
            groups=groups,
            fallback=fallback,
            windows=cfg.windows,
            block_template=cfg.block_template or DEFAULT_BLOCK_TEMPLATE,
            quic_reject=quic,
            https=cfg.https,
            warnings=tuple(warnings),
        )

    # -- group selection ----------------------------------------------------------------------

    def select_group(self, client_ip: str | IPAddress, client_mac: str | None = None) -> _Group:
        addr: IPAddress | None
        if isinstance(client_ip, str):
            try:
                addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
            except ValueError:
                addr = None
        else:
            addr = client_ip
        if addr is not None and addr.version == 6 and addr.ipv4_mapped is not None:
            # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d (RFC 4291 §2.5.5.2).
            addr = addr.ipv4_mapped
        mac = client_mac.lower().replace("-", ":") if client_mac else None
        for g in self.groups:
            if mac is not None and mac in g.macs:
                return g
            if addr is not None:
                for net in g.nets:
                    if addr.version == net.version and addr in net:
                        return g
        return self.fallback

    # -- decisions ------------------------------------------------------------------------------

    def _decide(
        self,
        group: _Group,
        rules: tuple[_Rule, ...],
        req: _Req,
        resp: _Response | None,
        now: datetime,
        trace: Trace | None = None,
    ) -> Verdict:
        weekday, minute = _local_clock(now)
        pending: list[_Rule] = []
        for rule in rules:
            if rule.window is not None and not rule.window.active(weekday, minute):
                if trace:
                    trace(f"  {rule.key} ({rule.action}): skipped, window {rule.window.name} off")
                continue
            ok, why, category = _request_match(rule, req)
            if not ok:
                if trace:
                    trace(f"  {rule.key} ({rule.action}): no match: {why}")
                continue
            if rule.cfg.response_side:
                if resp is None:
                    pending.append(rule)
                    if trace:
                        trace(f"  {rule.key} ({rule.action}): depends on the response ({why})")
                    continue
                rok, rwhy = _response_match(rule, resp)
                if not rok:
                    if trace:
                        trace(f"  {rule.key} ({rule.action}): no match: {rwhy}")
                    continue
                why = f"{why}, {rwhy}" if why != "matches everything" else rwhy
            if trace:
                trace(f"  {rule.key} ({rule.action}): MATCH: {why}")
            verdict = Verdict(rule.action, group.name, rule.key, why, category)
            break
        else:
            verdict = Verdict(group.default, group.name, group.default_key, "no rule matched")
            if trace:
                trace(f"  no rule matched: {group.default_key} = {group.default}")
        differing = [p for p in pending if p.action != verdict.action]
        if differing:
            why = f"the response head decides; else {verdict.rule} would {verdict.action}"
            return Verdict("allow", group.name, differing[0].key, why, None, False)
        return verdict

    def request_verdict(self, info: RequestInfo, trace: Trace | None = None) -> Verdict:
        group = self.select_group(info.client_ip, info.client_mac)
        # Rules see one spelling of the URL (percent-escapes, dot segments: see urlnorm).
        dest = match_host(info.dest_ip) if info.dest_ip else None
        verdicts = []
        for url, url_host, path in match_forms(info.url):
            host = match_host(info.host) if info.host else url_host
            req = _Req(self.categories, host, url, path, info.method, info.user_agent, dest)
            verdicts.append(self._decide(group, group.rules, req, None, info.now, trace))
        return _strictest(verdicts)

    def response_verdict(
        self,
        info: RequestInfo,
        status: int,
        content_type: str | None,
        content_length: int | None,
        url: str | None = None,
        trace: Trace | None = None,
    ) -> Verdict:
        """The verdict with the response head known (``status`` is informational: a 304 or
        a 1xx carries no body, so MIME/size rules do not apply to it)."""
        group = self.select_group(info.client_ip, info.client_mac)
        dest = match_host(info.dest_ip) if info.dest_ip else None
        no_body = status < 200 or status in (204, 304) or info.method.upper() == "HEAD"
        # No body (RFC 9110 §6.4.1: 1xx, 204, 304, and any response to HEAD): nothing for
        # MIME or size rules to judge.
        resp = (
            _Response(None, None)
            if no_body
            else _Response(media_type(content_type), content_length)
        )
        verdicts = []
        for full, url_host, path in match_forms(url if url is not None else info.url):
            host = match_host(info.host) if info.host else url_host
            req = _Req(self.categories, host, full, path, info.method, info.user_agent, dest)
            verdicts.append(self._decide(group, group.rules, req, resp, info.now, trace))
        return _strictest(verdicts)

    def sni_verdict(
        self,
        client_ip: str | IPAddress,
        sni: str | None,
        now: datetime,
        *,
        client_mac: str | None = None,
        trace: Trace | None = None,
        dest_ip: str | None = None,
    ) -> Verdict:
        group = self.select_group(client_ip, client_mac)
        if not self.https:
            return Verdict("allow", group.name, "filter.https", "HTTPS filtering is off")
        if sni:
            # ECH (0xfe0d) is decided by its outer name like any hello: Chrome sends a GREASE
            # ECH extension in every ClientHello (draft-ietf-tls-esni §6.2), indistinguishable
            # from a real one by design, so sending ECH flows to sni_default would put nearly
            # all browsing under it. Real ECH names the provider's public name (e.g.
            # cloudflare-ech.com): deny that name to stop hidden destinations.
            host = match_host(sni)
            dest = match_host(dest_ip) if dest_ip else None
            req = _Req(self.categories, host, None, None, None, None, dest)
            return self._decide(group, group.sni_rules, req, None, now, trace)
        if not group.sni_can_deny:
            return Verdict("allow", group.name, group.default_key, "group denies nothing by SNI")
        return Verdict(self.config.sni_default, group.name, "sni_default", "no SNI in ClientHello")

    # -- explanation ----------------------------------------------------------------------------

    def explain(
        self,
        info: RequestInfo,
        response: tuple[int, str | None, int | None] | None = None,
    ) -> str:
        """Human-readable trace: group, windows, each rule's outcome and the verdict."""
        lines: list[str] = []
        group = self.select_group(info.client_ip, info.client_mac)
        how = "fallback (no group matched the client)" if group is self.fallback else group.key
        lines.append(
            f"client {info.client_ip} (mac {info.client_mac or '-'}): group {group.name} [{how}]"
        )
        weekday, minute = _local_clock(info.now)
        clock = f"{DAYS[weekday]} {minute // 60:02d}:{minute % 60:02d}"
        lines.append(f"time {info.now.isoformat()} = {clock} local")
        for w in self.windows:
            state = "ACTIVE" if w.active(weekday, minute) else "inactive"
            days = ",".join(DAYS[d] for d in sorted(w.days))
            hours = ",".join(str(h) for h in w.hours)
            lines.append(f"window {w.name} ({days} {hours}): {state}")
        to = f" to {info.dest_ip}" if info.dest_ip else ""
        lines.append(f"request {info.method} {info.url} host={info.host}{to}")
        forms = [form[0] for form in match_forms(info.url)]
        if forms[0] != split_url(info.url)[0]:
            # The client's spelling differs from the one rules see (escapes, dot segments).
            lines.append(f"matched as {forms[0]}")
        for other in forms[1:]:
            lines.append(f"and as {other} (as IIS/Tomcat read it; denied if either is)")
        lines.append(f"rules of group {group.name}:")
        if response is None:
            v = self.request_verdict(info, trace=lines.append)
        else:
            status, ctype, length = response
            lines.append(f"response {status} type={ctype} length={length}")
            v = self.response_verdict(info, status, ctype, length, trace=lines.append)
        lines.append(f"verdict: {v.action.upper()} by {v.rule}: {v.reason}")
        if not v.final:
            lines.append(
                "(not final: a response-side rule decides once the response head is known)"
            )
        return "\n".join(lines)


def explain_sni(
    policy: Policy,
    client_ip: str,
    sni: str | None,
    now: datetime,
    *,
    ech: bool = False,
    client_mac: str | None = None,
    dest_ip: str | None = None,
) -> str:
    """Like :meth:`Policy.explain`, for a TLS flow known only by its SNI (and its server's
    address, which address entries in a rule's domains also match)."""
    group = policy.select_group(client_ip, client_mac)
    server = f" at {dest_ip}" if dest_ip else ""
    lines = [
        f"client {client_ip}: group {group.name}",
        f"TLS server name {sni or '(none)'}{server}",
    ]
    if ech:
        lines.append(
            "ClientHello has an ECH extension (GREASE or real): decided by this outer name;"
            " real ECH names only the provider's public name"
        )
    lines.append(f"rules of group {group.name} that apply to SNI (domains, categories, window):")
    v = policy.sni_verdict(
        client_ip, sni, now, client_mac=client_mac, trace=lines.append, dest_ip=dest_ip
    )
    lines.append(f"verdict: {v.action.upper()} by {v.rule}: {v.reason}")
    return "\n".join(lines)


def explain(
    policy: Policy,
    info: RequestInfo,
    response: tuple[int, str | None, int | None] | None = None,
) -> str:
    return policy.explain(info, response)


def render_block_page(template: str, verdict: Verdict, url: str, group: str | None = None) -> bytes:
    """The block page as UTF-8 HTML; every substituted value is HTML-escaped.

    ``template`` uses ``string.Template`` placeholders ($url, $host, $group, $rule, $reason,
    $action, $category); unknown ``$names`` are left as they are.
    """
    _, host, _ = split_url(url)
    values = {
        "url": url,
        "host": host,
        "group": group if group is not None else verdict.group,
        "rule": verdict.rule,
        "reason": verdict.reason,
        "action": verdict.action,
        "category": verdict.category or "",
    }
    escaped = {k: html.escape(v, quote=True) for k, v in values.items()}
    return string.Template(template).safe_substitute(escaped).encode("utf-8")

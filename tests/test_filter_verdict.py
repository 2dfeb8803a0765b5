"""Compiled policy: group selection, rules, windows, responses, SNI, block page, explain."""

from __future__ import annotations

import tomllib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.config import Reader
from tproxy.filter import (
    Policy,
    RequestInfo,
    explain_sni,
    load_categories,
    parse_filter,
    render_block_page,
)

# 2024-01-01 is a Monday.
MON_10 = datetime(2024, 1, 1, 10, 0)


def day(weekday: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 1, 1 + weekday, hour, minute)


def policy(text: str, categories_dir: Path | None = None) -> Policy:
    if categories_dir is not None:
        text = f'[filter]\ncategories_dir = "{categories_dir}"\n' + text.replace("[filter]\n", "")
    r = Reader(tomllib.loads(text).get("filter", {}), "t.toml", "filter")
    cfg = parse_filter(r)
    assert r.errors == [], [str(e) for e in r.errors]
    cats = None
    if categories_dir is not None:
        result = load_categories(categories_dir, cfg.used_categories)
        assert result.warnings == []
        cats = result.categories
    return Policy.compile(cfg, cats)


def req(
    url: str,
    client: str = "10.0.0.5",
    *,
    method: str = "GET",
    ua: str | None = "Mozilla/5.0",
    now: datetime = MON_10,
    mac: str | None = None,
    host: str | None = None,
) -> RequestInfo:
    if host is None:
        host = url.split("/")[2]
    return RequestInfo(client, mac, method, host, url, ua, now)


GROUPS = """
[[filter.group]]
name = "kids"
cidrs = ["10.0.0.0/24", "fd00:1::/64"]

[[filter.group]]
name = "staff"
cidrs = ["10.0.0.0/16", "fd00::/16"]
macs = ["02:00:00:00:00:99"]
"""


def test_default_allow_and_default_deny() -> None:
    p = policy("")
    v = p.request_verdict(req("http://anything.example/"))
    assert (v.action, v.group, v.rule, v.final) == ("allow", "default", "default", True)
    p = policy('[filter]\ndefault = "deny"\n')
    v = p.request_verdict(req("http://anything.example/"))
    assert (v.action, v.rule) == ("deny", "default")
    assert not v.allowed


def test_default_deny_with_allow_list() -> None:
    p = policy(
        '[filter]\ndefault = "deny"\n'
        + GROUPS
        + '[[filter.rule]]\ngroup = "*"\naction = "allow"\ndomains = ["school.example"]\n'
    )
    assert p.request_verdict(req("http://www.school.example/x")).action == "allow"
    v = p.request_verdict(req("http://notschool.example/x"))
    assert (v.action, v.group, v.rule) == ("deny", "kids", "default")
    v = p.request_verdict(req("http://school.example.evil/", client="192.0.2.1"))
    assert (v.action, v.group) == ("deny", "default")


@pytest.mark.parametrize(
    "client,mac,group",
    [
        ("10.0.0.5", None, "kids"),  # in both CIDRs: first in config order wins
        ("10.0.1.5", None, "staff"),
        ("::ffff:10.0.0.7", None, "kids"),  # dual-stack socket form of an IPv4 client
        ("fd00:1::5", None, "kids"),
        ("fd00:2::5", None, "staff"),
        ("192.0.2.1", "02-00-00-00-00-99", "staff"),  # by MAC
        ("192.0.2.1", None, "default"),
        ("2001:db8::1", None, "default"),
        ("not-an-ip", None, "default"),
    ],
)
def test_group_selection(client: str, mac: str | None, group: str) -> None:
    p = policy(GROUPS)
    assert p.select_group(client, mac).name == group
    assert p.request_verdict(req("http://x.example/", client, mac=mac)).group == group


def test_named_default_group_is_the_fallback() -> None:
    p = policy(
        GROUPS
        + '[[filter.group]]\nname = "default"\ndefault = "deny"\n'
        + '[[filter.rule]]\ngroup = "default"\naction = "allow"\ndomains = ["ok.example"]\n'
    )
    v = p.request_verdict(req("http://x.example/", "192.0.2.1"))
    assert (v.action, v.group, v.rule) == ("deny", "default", "filter.group[2].default")
    assert p.request_verdict(req("http://ok.example/", "192.0.2.1")).action == "allow"
    assert p.request_verdict(req("http://x.example/", "10.0.0.1")).action == "allow"


def test_domains_suffix_and_exact() -> None:
    p = policy(
        GROUPS
        + '[[filter.rule]]\ngroup = "kids"\naction = "deny"\n'
        + 'domains = ["bad.example", "=exact.example"]\n'
    )

    def action(url: str, host: str | None = None) -> str:
        return p.request_verdict(req(url, host=host)).action

    assert action("http://bad.example/") == "deny"
    assert action("http://x.bad.example/") == "deny"
    assert action("http://X.BAD.EXAMPLE.:8080/") == "deny"
    assert action("http://notbad.example/") == "allow"
    assert action("http://exact.example/") == "deny"
    assert action("http://www.exact.example/") == "allow"
    # The Host header is what counts (a proxy rebuilds the URL from it).
    assert action("http://10.1.1.1/", host="bad.example") == "deny"
    v = p.request_verdict(req("http://x.bad.example/"))
    assert v.rule == "filter.rule[0]" and "bad.example" in v.reason
    # Other groups are untouched by kids' rules.
    assert p.request_verdict(req("http://bad.example/", "10.0.5.5")).action == "allow"


WINDOWS = """
[[filter.window]]
name = "school"
days = ["mon", "tue", "wed", "thu", "fri"]
hours = "08:00-16:30"

[[filter.window]]
name = "night"
days = ["fri"]
hours = "22:00-06:00"

[[filter.rule]]
group = "kids"
action = "deny"
window = "school"
domains = ["games.example"]

[[filter.rule]]
group = "kids"
action = "deny"
window = "night"
"""


@pytest.mark.parametrize(
    "now,games,other",
    [
        (day(0, 10), "deny", "allow"),  # Monday in school hours
        (day(0, 8, 0), "deny", "allow"),  # start inclusive
        (day(0, 16, 30), "allow", "allow"),  # end exclusive
        (day(5, 10), "allow", "allow"),  # Saturday: no school
        (day(4, 21, 59), "allow", "allow"),  # Friday after school, before the night
        (day(4, 22, 0), "deny", "deny"),  # Friday night starts
        (day(5, 5, 59), "deny", "deny"),  # …and wraps into Saturday morning
        (day(5, 6, 0), "allow", "allow"),  # over
        (day(4, 3, 0), "allow", "allow"),  # Friday 03:00 belongs to Thursday night: off
        (day(6, 3, 0), "allow", "allow"),  # Sunday 03:00: Saturday night is not listed
    ],
)
def test_windows(now: datetime, games: str, other: str) -> None:
    p = policy(GROUPS + WINDOWS)
    assert p.request_verdict(req("http://games.example/", now=now)).action == games
    assert p.request_verdict(req("http://other.example/", now=now)).action == other


def test_window_uses_local_time_for_aware_datetimes() -> None:
    p = policy(GROUPS + WINDOWS)
    local = day(0, 10).astimezone()  # Monday 10:00 local, as an aware datetime
    in_utc = local.astimezone(UTC)
    assert p.request_verdict(req("http://games.example/", now=in_utc)).action == "deny"
    later = in_utc + timedelta(hours=8)
    assert p.request_verdict(req("http://games.example/", now=later)).action == "allow"


def test_url_method_agent_extension_matchers() -> None:
    p = policy(
        GROUPS
        + """
[[filter.rule]]
group = "*"
action = "deny"
url_prefix = ["Example.com/Ads/"]

[[filter.rule]]
group = "*"
action = "deny"
url_regex = ["[?&]utm_[a-z]+=", "/track(ing)?/"]

[[filter.rule]]
group = "*"
action = "deny"
methods = ["POST"]
domains = ["upload.example"]

[[filter.rule]]
group = "*"
action = "deny"
user_agent = "(?i)curl/"

[[filter.rule]]
group = "*"
action = "deny"
extensions = [".exe", "msi"]
"""
    )

    def verdict(url: str, **kw: object) -> tuple[str, str]:
        v = p.request_verdict(req(url, **kw))  # type: ignore[arg-type]
        return v.action, v.rule

    assert verdict("http://EXAMPLE.com:80/Ads/x.png") == ("deny", "filter.rule[0]")
    assert verdict("http://example.com/ads/x.png") == ("allow", "default")  # path case kept
    assert verdict("http://a.example/p?x=1&utm_source=t") == ("deny", "filter.rule[1]")
    assert verdict("http://a.example/tracking/1") == ("deny", "filter.rule[1]")
    assert verdict("http://upload.example/f", method="POST") == ("deny", "filter.rule[2]")
    assert verdict("http://upload.example/f", method="GET") == ("allow", "default")
    assert verdict("http://a.example/", ua="curl/8.0") == ("deny", "filter.rule[3]")
    assert verdict("http://a.example/", ua=None) == ("allow", "default")
    assert verdict("http://a.example/setup.EXE?v=2") == ("deny", "filter.rule[4]")
    assert verdict("http://a.example/setup.msi") == ("deny", "filter.rule[4]")
    assert verdict("http://a.example/exe/readme") == ("allow", "default")


def test_categories(tmp_path: Path) -> None:
    (tmp_path / "adult").mkdir()
    (tmp_path / "adult" / "domains").write_text("porn.example\n")
    (tmp_path / "adult" / "urls").write_text("mixed.example/adult/\n")
    (tmp_path / "games").mkdir()
    (tmp_path / "games" / "domains").write_text("games.example\n")
    p = policy(
        GROUPS + '[[filter.rule]]\ngroup = "*"\naction = "deny"\ncategories = ["adult"]\n',
        tmp_path,
    )
    assert p.categories.names == {"adult"}  # only categories in use are loaded
    v = p.request_verdict(req("http://www.porn.example/"))
    assert (v.action, v.category, v.rule) == ("deny", "adult", "filter.rule[0]")
    assert "category:adult (porn.example)" in v.reason
    assert p.request_verdict(req("http://mixed.example/adult/x")).action == "deny"
    assert p.request_verdict(req("http://mixed.example/kids/")).action == "allow"
    assert p.request_verdict(req("http://games.example/")).action == "allow"
    # SNI uses the domain lists, not the URL lists.
    assert p.sni_verdict("10.0.0.5", "porn.example", MON_10).action == "deny"
    assert p.sni_verdict("10.0.0.5", "mixed.example", MON_10).action == "allow"


def test_missing_category_is_a_compile_warning(tmp_path: Path) -> None:
    (tmp_path / "adult").mkdir()
    r = Reader(
        tomllib.loads(
            f'[filter]\ncategories_dir = "{tmp_path}"\n'
            '[[filter.rule]]\ngroup = "*"\naction = "deny"\ncategories = ["adult"]\n'
        )["filter"],
        "t.toml",
        "filter",
    )
    p = Policy.compile(parse_filter(r))
    assert p.warnings == ("filter.rule[0]: category 'adult' is not loaded; matches nothing",)
    assert p.request_verdict(req("http://porn.example/")).action == "allow"


RESPONSE_RULES = """
[[filter.rule]]
group = "*"
action = "allow"
mime = ["text/html"]
domains = ["mixed.example"]

[[filter.rule]]
group = "*"
action = "deny"
domains = ["mixed.example"]

[[filter.rule]]
group = "*"
action = "deny"
mime = ["video/*", "application/x-msdownload"]

[[filter.rule]]
group = "*"
action = "deny"
max_response_size = "1MiB"
"""


def test_response_rules() -> None:
    p = policy(RESPONSE_RULES)
    info = req("http://videos.example/v")
    tentative = p.request_verdict(info)
    # Deny-by-MIME could still apply: the request goes out, the response decides.
    assert tentative.action == "allow" and not tentative.final
    v = p.response_verdict(info, 200, "video/mp4; codecs=avc1", 5000)
    assert (v.action, v.rule, v.final) == ("deny", "filter.rule[2]", True)
    v = p.response_verdict(info, 200, "Application/X-MSDownload", 5000)
    assert v.action == "deny"
    assert p.response_verdict(info, 200, "text/html", 5000).action == "allow"
    v = p.response_verdict(info, 200, "text/html", 2 * 1024 * 1024)
    assert (v.action, v.rule) == ("deny", "filter.rule[3]")
    assert p.response_verdict(info, 200, "text/html", None).action == "allow"
    # No body, no MIME/size decision.
    assert p.response_verdict(info, 304, "video/mp4", 5000).action == "allow"
    head = req("http://videos.example/v", method="HEAD")
    assert p.response_verdict(head, 200, "video/mp4", 5000).action == "allow"


def test_pending_allow_overrides_later_deny() -> None:
    p = policy(RESPONSE_RULES)
    info = req("http://mixed.example/page")
    tentative = p.request_verdict(info)
    assert tentative.action == "allow" and not tentative.final
    assert tentative.rule == "filter.rule[0]" and "filter.rule[1] would deny" in tentative.reason
    v = p.response_verdict(info, 200, "text/html; charset=utf-8", 100)
    assert (v.action, v.rule) == ("allow", "filter.rule[0]")
    v = p.response_verdict(info, 200, "image/png", 100)
    assert (v.action, v.rule) == ("deny", "filter.rule[1]")


def test_final_when_no_response_rule_can_change_it() -> None:
    p = policy(
        '[[filter.rule]]\ngroup = "*"\naction = "deny"\nmime = ["video/*"]\n'
        '[[filter.rule]]\ngroup = "*"\naction = "deny"\ndomains = ["bad.example"]\n'
    )
    v = p.request_verdict(req("http://bad.example/"))
    assert v.action == "deny" and v.final  # both possible outcomes deny


def test_sni_verdicts() -> None:
    p = policy(
        '[filter]\nsni_default = "deny"\n'
        + GROUPS
        + WINDOWS
        + """
[[filter.rule]]
group = "kids"
action = "deny"
url_prefix = ["http://docs.example/private/"]

[[filter.rule]]
group = "kids"
action = "deny"
domains = ["bad.example"]
"""
    )
    v = p.sni_verdict("10.0.0.5", "x.bad.example", MON_10)
    assert (v.action, v.rule) == ("deny", "filter.rule[3]")
    assert p.sni_verdict("10.0.0.5", "Bad.Example.", MON_10).action == "deny"
    # A URL rule cannot apply to a TLS flow: the domain is not blocked as a whole.
    assert p.sni_verdict("10.0.0.5", "docs.example", MON_10).action == "allow"
    # Windows apply to SNI.
    assert p.sni_verdict("10.0.0.5", "games.example", MON_10).action == "deny"
    assert p.sni_verdict("10.0.0.5", "games.example", day(5, 12)).action == "allow"
    # No SNI: sni_default for a group that filters, allow for one that cannot deny anything.
    v = p.sni_verdict("10.0.0.5", None, MON_10)
    assert (v.action, v.rule) == ("deny", "sni_default")
    assert p.sni_verdict("10.0.1.5", None, MON_10).action == "allow"
    # ECH: decided by the outer name like any hello (browsers GREASE ECH into every hello);
    # real ECH is stopped by a rule on the provider's public name.
    v = p.sni_verdict("10.0.0.5", "cloudflare-ech.com", MON_10)
    assert (v.action, v.rule) == ("allow", "default")
    assert p.sni_verdict("10.0.0.5", "bad.example", MON_10).action == "deny"
    assert p.sni_verdict("10.0.1.5", "cloudflare-ech.com", MON_10).action == "allow"
    assert p.sni_verdict("fd00:1::9", "bad.example", MON_10).action == "deny"


def test_https_off_and_quic_reject() -> None:
    rule = '[[filter.rule]]\ngroup = "*"\naction = "deny"\ndomains = ["bad.example"]\n'
    p = policy("[filter]\nhttps = false\n" + rule)
    assert p.sni_verdict("10.0.0.5", "bad.example", MON_10).action == "allow"
    assert not p.quic_reject
    assert policy(rule).quic_reject  # auto: something can be denied by SNI
    assert not policy("").quic_reject  # auto: nothing to enforce
    url_only = '[[filter.rule]]\ngroup = "*"\naction = "deny"\nurl_prefix = ["a.example/x"]\n'
    assert not policy(url_only).quic_reject
    assert policy('[filter]\ndefault = "deny"\n').quic_reject
    assert policy('[filter]\nquic_reject = "true"\n').quic_reject
    assert not policy("[filter]\nquic_reject = false\n" + rule).quic_reject


def test_block_page_escapes() -> None:
    p = policy('[[filter.rule]]\ngroup = "*"\naction = "deny"\ndomains = ["bad.example"]\n')
    url = 'http://bad.example/<script>alert("x")</script>?a=1&b=2'
    v = p.request_verdict(req(url))
    page = render_block_page(p.block_template, v, url, v.group)
    text = page.decode()
    assert "<script>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;?a=1&amp;b=2" in text
    assert "filter.rule[0]" in text and "<html" in text
    custom = render_block_page("$host $category $unknown $$", v, url, "<b>g</b>")
    assert custom == b"bad.example  $unknown $"
    assert render_block_page("$group", v, url, "<b>g</b>") == b"&lt;b&gt;g&lt;/b&gt;"


def test_explain() -> None:
    p = policy(GROUPS + WINDOWS + RESPONSE_RULES)
    text = p.explain(req("http://games.example/x", now=day(0, 9, 15)))
    assert "group kids [filter.group[0]]" in text
    assert "mon 09:15" in text
    assert "window school (mon,tue,wed,thu,fri 08:00-16:30): ACTIVE" in text
    assert "window night (fri 22:00-06:00): inactive" in text
    assert "filter.rule[0] (deny): MATCH: domain games.example" in text
    assert text.splitlines()[-1] == "verdict: DENY by filter.rule[0]: domain games.example"
    text = p.explain(req("http://games.example/", now=day(5, 9)), (200, "video/mp4", 10))
    assert "filter.rule[0] (deny): skipped, window school off" in text
    assert "response 200 type=video/mp4 length=10" in text
    assert "verdict: DENY by filter.rule[4]: Content-Type video/mp4" in text
    text = p.explain(req("http://x.example/", "192.0.2.1"))
    assert "group default [fallback (no group matched the client)]" in text
    assert "filter.rule[0]" not in text  # kids' rules are not the fallback group's
    assert "not final" in text
    text = explain_sni(p, "10.0.0.5", "games.example", day(0, 9))
    assert "filter.rule[0] (deny): MATCH" in text and "filter.rule[2]" not in text
    assert text.endswith("verdict: DENY by filter.rule[0]: domain games.example")


@settings(max_examples=200, deadline=None)
@given(
    url=st.text(max_size=60),
    host=st.text(max_size=30),
    client=st.one_of(st.ip_addresses().map(str), st.text(max_size=20)),
    sni=st.one_of(st.none(), st.text(max_size=40)),
    ctype=st.one_of(st.none(), st.text(max_size=30)),
)
def test_odd_input_never_raises(
    url: str, host: str, client: str, sni: str | None, ctype: str | None
) -> None:
    p = _FUZZ_POLICY
    info = RequestInfo(client, None, "GET", host, url, None, MON_10)
    assert p.request_verdict(info).action in ("allow", "deny")
    assert p.response_verdict(info, 200, ctype, 10).action in ("allow", "deny")
    assert p.sni_verdict(client, sni, MON_10).action in ("allow", "deny")
    render_block_page(p.block_template, p.request_verdict(info), url)


_FUZZ_POLICY = policy(GROUPS + WINDOWS + RESPONSE_RULES)


def test_loading_in_a_worker_thread_while_serving(tmp_path: Path) -> None:
    """SIGHUP reload: lists load in a thread; the old policy keeps answering meanwhile."""
    (tmp_path / "adult").mkdir()
    (tmp_path / "adult" / "domains").write_text("".join(f"d{i}.example\n" for i in range(50000)))
    old = policy(GROUPS)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(load_categories, tmp_path)
        served = 0
        while not future.done():
            assert old.request_verdict(req("http://d1.example/")).action == "allow"
            served += 1
        result = future.result()
    assert result.categories.domain_categories("x.d49999.example") == {"adult": "d49999.example"}
    assert served > 0

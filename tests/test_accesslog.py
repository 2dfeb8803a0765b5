"""The access log is Squid's native format, field for field."""

from __future__ import annotations

from pathlib import Path

from tproxy.accesslog import AccessLog, AccessRecord, format_record


def record(**kw: object) -> AccessRecord:
    base: dict[str, object] = {
        "start": 1700000000.1234,
        "elapsed_ms": 45,
        "client": "10.0.0.5",
        "result": "TCP_MISS",
        "status": 200,
        "size": 1234,
        "method": "GET",
        "url": "http://example.com/a",
        "hierarchy": "HIER_DIRECT",
        "peer": "192.0.2.7",
        "content_type": "text/html",
    }
    base.update(kw)
    return AccessRecord(**base)  # type: ignore[arg-type]


def test_squid_native_fields() -> None:
    line = format_record(record())
    assert line == (
        "1700000000.123     45 10.0.0.5 TCP_MISS/200 1234 GET http://example.com/a - "
        "HIER_DIRECT/192.0.2.7 text/html\n"
    )
    # Ten whitespace-separated fields, as Squid log parsers expect.
    assert len(line.split()) == 10


def test_spaces_and_controls_cannot_shift_columns() -> None:
    line = format_record(record(url="http://x/a b\tc\n", content_type=""))
    assert len(line.split()) == 10
    assert "http://x/a%20b%09c%0A" in line
    assert line.rstrip("\n").endswith(" -")


def test_reopen_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write(record(url="http://one/"))
    path.rename(tmp_path / "access.log.1")
    log.reopen()
    log.write(record(url="http://two/"))
    log.close()
    assert "http://one/" in (tmp_path / "access.log.1").read_text()
    assert "http://two/" in path.read_text()


def test_enabled_follows_the_open_file(tmp_path: Path) -> None:
    off = AccessLog("")
    assert not off.enabled
    on = AccessLog(str(tmp_path / "access.log"))
    assert on.enabled
    on.close()
    assert not on.enabled

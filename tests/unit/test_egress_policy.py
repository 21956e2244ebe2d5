"""The egress proxy's decisions and its HTTP/1.1 messages, fed heads and leases (no sockets)."""

from __future__ import annotations

import ipaddress
import time

import pytest

from shared.lease import glob_match_prefix
from supervisor.core.authority import Authority
from supervisor.egress.messages import (
    MAX_HEADERS, MAX_REQUEST_LINE, HeadError, RequestParser, ResponseParser, body_framing, chunk, error_response,
    last_chunk, parse_head, upstream_head,
)
from supervisor.egress.policy import (
    Refusal, address_kind, canonical_path, check_host_header, check_lease, check_path, destination_of, ip_literal,
    usable_addresses,
)

ip = ipaddress.ip_address


def auth(*patterns: str, expires_at: float | None = None, budget: list[str] | None = None) -> Authority:
    lease: dict[str, list[str]] = {"net.fetch": list(patterns)}
    if budget:
        lease["cost.budget"] = budget
    return Authority(lease, expires_at)


def dest(raw: str):  # type: ignore[no-untyped-def]
    head = parse_head(raw.encode())
    d = destination_of(head)
    check_host_header(head, d)
    return d


# -- parsing -----------------------------------------------------------------------------
def test_a_plain_request_parses_to_its_destination() -> None:
    d = dest("GET http://Example.COM/a/b?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert (d.tunnel, d.scheme, d.host, d.port, d.authority) == (False, "http", "example.com", 80, "example.com")
    assert d.url == "http://example.com/a/b?q=1" and d.origin_form == "/a/b?q=1"
    d = dest("GET http://example.com:8080 HTTP/1.0\r\n\r\n")
    assert d.authority == "example.com:8080" and d.origin_form == "/"


def test_connect_parses_host_and_port() -> None:
    d = dest("CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n")
    assert (d.tunnel, d.url, d.port) == (True, "https://api.example.com", 443)
    d = dest("CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n")
    assert d.url == "https://[::1]:8443" and d.ip == ip("::1")


@pytest.mark.parametrize("raw,status", [
    ("GARBAGE\r\n\r\n", 400),
    ("GET /relative HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("GET ftp://h/x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("GET https://h/x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("GET http://h/x HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    ("GET http://h/x FOO\r\nHost: h\r\n\r\n", 400),
    ("GET http://h/x HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 needs a Host header (RFC 9112 §3.2)
    ("GET http://h/x HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n", 400),
    ("CONNECT h HTTP/1.0\r\n\r\n", 400),
    ("CONNECT h:99999 HTTP/1.0\r\n\r\n", 400),
    ("CONNECT h:0 HTTP/1.0\r\n\r\n", 400),
    ("GET http://u:p@h/x HTTP/1.0\r\n\r\n", 400),
    ("GET http://-h/x HTTP/1.0\r\n\r\n", 400),
    ("GET http://bad host/x HTTP/1.0\r\n\r\n", 400),
    ("GET http://[fe80::1%25eth0]/ HTTP/1.0\r\n\r\n", 400),
    ("GET http://h/x HTTP/1.1\r\nHost: h\r\n folded: yes\r\n\r\n", 400),
    ("GET http://h/x HTTP/1.1\r\nHost: h\r\nno colon\r\n\r\n", 400),
    ("GET http://h/x HTTP/1.1\r\nHost: h\r\nX : y\r\n\r\n", 400),
    ("GET http://h/x HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n", 400),
    ("GET http://h/" + "a" * MAX_REQUEST_LINE + " HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    ("GET http://h/x HTTP/1.1\r\nHost: h\r\n" + "X: y\r\n" * MAX_HEADERS + "\r\n", 431),
])
def test_bad_heads_get_a_status_and_a_message(raw: str, status: int) -> None:
    with pytest.raises(HeadError) as e:
        dest(raw)
    assert e.value.status == status and e.value.message


def test_the_host_header_must_agree() -> None:
    dest("CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n")  # the default port may be left out
    dest("GET http://h:8080/ HTTP/1.1\r\nHost: H:8080\r\n\r\n")
    for raw in ("CONNECT h:443 HTTP/1.1\r\nHost: other:443\r\n\r\n",
                "CONNECT h:8443 HTTP/1.1\r\nHost: h\r\n\r\n",
                "GET http://h/ HTTP/1.1\r\nHost: \r\n\r\n"):
        with pytest.raises(Refusal):
            dest(raw)


def test_ip_literals_in_every_form_are_recognised() -> None:
    for form in ("127.0.0.1", "127.1", "0x7f.1", "2130706433", "0177.0.0.1"):
        assert ip_literal(form) == ip("127.0.0.1"), form
    assert ip_literal("::ffff:127.0.0.1") == ip("::ffff:127.0.0.1")
    assert ip_literal("localhost") is None and ip_literal("example.com") is None


# -- the lease ---------------------------------------------------------------------------
def test_plain_http_is_checked_by_full_canonical_url() -> None:
    a = auth("http://example.com/public/**")
    assert check_lease(a, dest("GET http://example.com/public/a HTTP/1.0\r\n\r\n"), time.time())
    assert check_lease(a, dest("GET http://EXAMPLE.com:80/public/a HTTP/1.0\r\n\r\n"), time.time())
    for url in ("http://example.com/private", "http://example.com/public/%2e%2e/private",
                "http://example.com/public/../private", "http://example.com:8080/public/a",
                "http://example.com.evil.test/public/a"):
        with pytest.raises(Refusal) as e:
            check_lease(a, dest(f"GET {url} HTTP/1.0\r\n\r\n"), time.time())
        assert e.value.code == "PERMISSION_DENIED" and "http://example.com/public/**" in e.value.reason


def test_connect_is_checked_by_scheme_host_and_port_only() -> None:
    a = auth("https://api.example.com/v1/**")
    check_lease(a, dest("CONNECT api.example.com:443 HTTP/1.0\r\n\r\n"), time.time())
    for target in ("api.example.com:8443", "other.example.com:443"):
        with pytest.raises(Refusal):
            check_lease(a, dest(f"CONNECT {target} HTTP/1.0\r\n\r\n"), time.time())
    with pytest.raises(Refusal):  # an http:// pattern grants no tunnel
        check_lease(auth("http://api.example.com/**"), dest("CONNECT api.example.com:443 HTTP/1.0\r\n\r\n"),
                    time.time())
    check_lease(auth("https://*.example.com/**"), dest("CONNECT a.example.com:443 HTTP/1.0\r\n\r\n"), time.time())


def test_prefix_matching_of_tunnel_targets() -> None:
    assert glob_match_prefix("https://h/a/**", "https://h")
    assert glob_match_prefix("**", "https://h")
    assert not glob_match_prefix("https://h/a/**", "https://h:1")
    assert not glob_match_prefix("https:/", "https://h")


def test_ip_literals_need_a_pattern_naming_them() -> None:
    named = auth("http://127.0.0.1:8080/**")
    assert check_lease(named, dest("GET http://127.0.0.1:8080/x HTTP/1.0\r\n\r\n"), time.time())
    for url in ("http://127.1:8080/x", "http://[::1]:8080/x", "http://2130706433:8080/x",
                "http://[::ffff:127.0.0.1]:8080/x"):
        with pytest.raises(Refusal):
            check_lease(named, dest(f"GET {url} HTTP/1.0\r\n\r\n"), time.time())
    with pytest.raises(Refusal) as e:  # a wildcard host does not name a literal
        check_lease(auth("http://*:8080/**"), dest("GET http://127.0.0.1:8080/x HTTP/1.0\r\n\r\n"), time.time())
    assert "IP address" in e.value.reason


def test_expiry_then_pattern_then_budget() -> None:
    d = dest("GET http://h/x HTTP/1.0\r\n\r\n")
    with pytest.raises(Refusal) as e:
        check_lease(auth("http://other/**", expires_at=time.time() - 1), d, time.time())
    assert e.value.code == "LEASE_EXPIRED"
    a = auth("http://h/**", budget=["USD:1"])
    check_lease(a, d, time.time())
    a.debit_metric("cost.x", 1.0, "USD")
    with pytest.raises(Refusal) as e:
        check_lease(a, d, time.time())
    assert e.value.code == "BUDGET_EXHAUSTED"


# -- addresses (classified, never connected to) --------------------------------------------
@pytest.mark.parametrize("addr,kind", [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
    ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"), ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"), ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.1", "multicast"),
    ("100.64.0.1", "reserved"), ("240.0.0.1", "private"), ("::ffff:10.0.0.1", "private"),
    ("93.184.215.14", None),
])
def test_address_kinds(addr: str, kind: str | None) -> None:
    assert address_kind(ip(addr)) == kind


def test_names_resolving_to_special_addresses_need_a_pattern_naming_the_host() -> None:
    d = dest("GET http://svc.internal.test/x HTTP/1.0\r\n\r\n")
    wildcard = check_lease(auth("http://*.test/**"), d, time.time())
    assert wildcard is False
    for addrs in ([ip("169.254.169.254")], [ip("10.0.0.5")], [ip("127.0.0.1"), ip("::1")], [ip("fe80::1")]):
        with pytest.raises(Refusal) as e:
            usable_addresses(d, addrs, wildcard)
        assert "svc.internal.test" in e.value.reason
    named = check_lease(auth("http://svc.internal.test/**"), d, time.time())
    assert named is True and usable_addresses(d, [ip("10.0.0.5")], named) == [ip("10.0.0.5")]
    mixed = [ip("10.0.0.5"), ip("93.184.215.14")]  # only the global one is used
    assert usable_addresses(d, mixed, wildcard) == [ip("93.184.215.14")]


# -- ambiguous paths and the canonical request target --------------------------------------
@pytest.mark.parametrize("path,reason", [
    ("/public/..;/private", "';' path parameter"),
    ("/public/..;x=1/private", "';' path parameter"),
    ("/public/.%2e;/private", "';' path parameter"),
    ("/public/;../private", "';' path parameter"),
    ("/public/..%3b/private", "';' path parameter"),
    ("/public/..\\private", "backslash"),
    ("/public\\..\\private", "backslash"),
    ("/public/..%5cprivate", "encoded backslash"),
    ("/public/..%5Cprivate", "encoded backslash"),
    ("/public/..%2fprivate", "encoded slash"),
    ("/public%2F..%2Fprivate", "encoded slash"),
    ("/public/%252e%252e/private", "double-encoded"),
    ("/public/%25252e%25252e/private", "double-encoded"),
    ("/public/%25%32%65%25%32%65/private", "double-encoded"),
    ("/public/..%252fprivate", "double-encoded"),
    ("/public/..%255cprivate", "double-encoded"),
    ("/public/%%32e%%32e/private", "'%' not followed by two hex digits"),
    ("/public/100%", "'%' not followed by two hex digits"),
    ("/public/%c0%ae%c0%ae/private", "overlong"),
])
def test_ambiguous_paths_are_refused_naming_the_reason(path: str, reason: str) -> None:
    with pytest.raises(HeadError) as e:
        dest(f"GET http://h{path} HTTP/1.1\r\nHost: h\r\n\r\n")
    assert e.value.status == 400 and reason in e.value.message and "ambiguous path" in e.value.message


@pytest.mark.parametrize("target,origin", [
    ("/a/./b/../c", "/a/c"),
    ("/a/%2e%2E/b", "/b"),
    ("/../../etc", "/etc"),
    ("/a//b///c", "/a/b/c"),
    ("/a/b/", "/a/b/"),
    ("/a/b/..", "/a/"),
    ("", "/"),
    ("?q=1", "/?q=1"),
    ("/%7euser/%41%62c", "/~user/Abc"),
    ("/x%3bY/%3a%e9:@", "/x%3BY/%3A%E9:@"),
    ("/a;v=1/b", "/a;v=1/b"),
    ("/%25/50%25", "/%25/50%25"),
    ("/q\"{x}|^`<>", "/q%22%7Bx%7D%7C%5E%60%3C%3E"),
    ("/p?a=..;/&b=%2f\\", "/p?a=..;/&b=%2f\\"),  # the query is not a path: passed as it came
    ("/p#frag", "/p"),
])
def test_the_request_line_is_built_from_the_canonical_url(target: str, origin: str) -> None:
    d = dest(f"GET http://h{target} HTTP/1.1\r\nHost: h\r\n\r\n")
    assert d.origin_form == origin and d.url == f"http://h{origin}"
    check_path(origin.partition("?")[0])  # what is forwarded passes the same rules
    assert canonical_path(origin.partition("?")[0]) == origin.partition("?")[0]


def test_a_semicolon_or_dots_alone_are_not_ambiguous() -> None:
    for path in ("/a;b/c", "/a..b/c", "/.;/c", "/v1.2/x;y", "/50%25", "/%2541", "/%2525252541"):
        check_path(path)
    with pytest.raises(HeadError) as e:  # an escape left after five decodings
        check_path("/%252525252541")
    assert "after 5 decodings" in e.value.message


# -- bodies as h11 frames them, framed afresh ------------------------------------------------
def _body(raw: bytes) -> tuple[tuple[str, int], list[bytes | list[tuple[str, str]]]]:
    parser = RequestParser()
    head_end = raw.index(b"\r\n\r\n") + 4
    parser.head(raw[:head_end])
    parser.feed(raw[head_end:])
    out: list[bytes | list[tuple[str, str]]] = []
    while True:
        piece = parser.next_body()
        if piece is None:
            return parser.framing, out
        out.append(piece)
        if isinstance(piece, list):
            return parser.framing, out


def test_chunk_sizes_are_hex_digits_only() -> None:
    for size in (b"0x2e", b"+5", b"-1", b" 5", b"5 5", b"1_0", b""):
        with pytest.raises(HeadError) as e:
            _body(b"POST http://h/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\n")
        assert e.value.status == 400 and "chunk" in e.value.message, size
    framing, pieces = _body(b"POST http://h/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\nGET /private HTTP/1.1\r\n\r\n")
    assert framing == ("chunked", 0) and pieces == [b"abc", [("X-Trailer", "t")]]
    assert chunk(b"abc") == b"3\r\nabc\r\n" and last_chunk([("X-Trailer", "t")]) == b"0\r\nX-Trailer: t\r\n\r\n"
    assert last_chunk([("Content-Length", "9"), ("Connection", "x")]) == b"0\r\n\r\n"


def test_a_length_body_ends_where_it_says() -> None:
    framing, pieces = _body(b"POST http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET /private")
    assert framing == ("length", 5) and pieces == [b"hello", []]


def test_a_body_that_comes_after_its_head_is_waited_for() -> None:
    """Nothing read yet after the head is not the end of the stream: the body is awaited."""
    parser = RequestParser()
    parser.head(b"POST http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n")
    parser.feed(b"")
    assert parser.next_body() is None
    parser.feed(b"hel")
    assert parser.next_body() == b"hel"
    parser.feed(b"lo")
    assert parser.next_body() == b"lo" and parser.next_body() == []


def test_body_framing() -> None:
    def framing(headers: str, version: str = "HTTP/1.1") -> tuple[str, int]:
        parser = RequestParser()
        head = parser.head(f"POST http://h/ {version}\r\nHost: h\r\n{headers}\r\n".encode())
        assert body_framing(head) == parser.framing
        return parser.framing
    assert framing("") == ("none", 0)
    assert framing("Content-Length: 5\r\n") == ("length", 5)
    assert framing("Content-Length: 0\r\n") == ("length", 0)
    assert framing("Transfer-Encoding: chunked\r\n") == ("chunked", 0)
    for bad, version, status in (("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "HTTP/1.1", 400),
                                 ("Transfer-Encoding: chunked\r\n", "HTTP/1.0", 400),
                                 ("Content-Length: -1\r\n", "HTTP/1.1", 400),
                                 ("Content-Length: 0x10\r\n", "HTTP/1.1", 400),
                                 ("Content-Length: 1\r\nContent-Length: 2\r\n", "HTTP/1.1", 400),
                                 ("Transfer-Encoding: gzip, chunked\r\n", "HTTP/1.1", 501)):
        with pytest.raises(HeadError) as e:
            framing(bad, version)
        assert e.value.status == status, bad


# -- what goes upstream and back -------------------------------------------------------------
def test_the_upstream_head_is_written_afresh() -> None:
    head = parse_head(b"POST http://h:81/a/./p?q HTTP/1.1\r\nHost: H:81\r\nProxy-Connection: keep-alive\r\n"
                      b"Proxy-Authorization: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
                      b"Accept:   */*  \r\nTransfer-Encoding: chunked\r\n\r\n")
    out = upstream_head(head, destination_of(head)).decode()
    assert out == ("POST /a/p?q HTTP/1.1\r\nHost: h:81\r\nAccept: */*\r\nTransfer-Encoding: chunked\r\n"
                   "Connection: close\r\n\r\n"), out
    head = parse_head(b"GET http://h/ HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    assert upstream_head(head, destination_of(head)).decode() == \
        "GET / HTTP/1.0\r\nHost: h\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def _response(raw: bytes, method: str = "GET") -> list[tuple[bytes, bool]]:
    r = ResponseParser(method)
    r.feed(raw)
    out = []
    while (got := r.next_head()) is not None:
        out.append(got)
        if not got[1]:
            break
    return out


def test_response_heads_are_written_afresh_and_closed() -> None:
    r = ResponseParser("GET")
    r.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: 5\r\n"
           b"X-Hop: 1\r\nX:  y \r\nContent-Length: 2\r\n\r\nok")
    assert r.next_head() == (b"HTTP/1.1 100 Continue\r\n\r\n", True)
    assert r.next_head() == (b"HTTP/1.1 200 OK\r\nX: y\r\nContent-Length: 2\r\nConnection: close\r\n\r\n", False)
    assert r.rest() == b"ok"
    out = _response(b"HTTP/1.0 404 \r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n")
    assert out == [(b"HTTP/1.0 404\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n", False)]
    assert _response(b"HTTP/1.1 200 OK\r\nContent-") == []  # more bytes needed
    for bad in (b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"):
        with pytest.raises(HeadError) as e:
            _response(bad)
        assert e.value.status == 502


def test_error_responses_are_complete_http() -> None:
    r = error_response(403, "refused: http://h/x", "PERMISSION_DENIED").decode()
    head, _, body = r.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 403 Forbidden") and "X-ARCP-Error: PERMISSION_DENIED" in head
    assert f"Content-Length: {len(body.encode())}" in head and body == "refused: http://h/x\n"

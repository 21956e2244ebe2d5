"""The egress proxy's decisions, free of I/O: parse what a job sends, judge it by the lease.

A job whose lease holds `net.fetch` reaches the network only through the
supervisor's proxy. For each request the proxy reads the head (bounded), has h11
parse it (`RequestParser`; h11 also frames the body, so a chunk size is hex or
the request is refused), finds the destination, and asks this module:

  - plain HTTP (`GET http://host/path HTTP/1.1`): the full URL, canonicalised as
    protocol.md §8.3 says, must match a `net.fetch` pattern;
  - HTTPS (`CONNECT host:443`): the path is inside the encrypted stream, so only
    the scheme, host and port can be checked: some pattern must match
    `https://host[:port]` followed by some path;
  - the `Host` header, when present, must name the same host and port;
  - an IP literal is allowed only when a matching pattern names that literal;
  - a name is resolved by the supervisor, and an address that is loopback,
    private, link-local, metadata or otherwise not global is used only when a
    matching pattern names the host itself (no `*` in its host part);
  - then the lease's expiry and budget, as for `validate_lease_op`.

Default ports are dropped before matching (`http://h:80/x` is `http://h/x`). A path
that origins could read in different ways (`check_path`) is refused before any of
this, and what goes upstream is written afresh (`upstream_head`, `chunk`): the
request line from the canonical URL, the job's fields re-emitted, the body framed
by the proxy. Nothing the job sent is forwarded as raw bytes but a body's data.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import string
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes, urlsplit

import h11

from shared.lease import canonical_target, glob_match, glob_match_prefix
from supervisor.core.authority import Authority

MAX_REQUEST_LINE = 8192
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
DEFAULT_PORT = {"http": 80, "https": 443}
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                        "proxy-authenticate", "te", "trailer", "upgrade"})
FRAMING = frozenset({"host", "content-length", "transfer-encoding"})  # written by the proxy itself
CONTROL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
PCT_VALID_RE = re.compile(r"(?:[^%]|%[0-9A-Fa-f]{2})*")
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
PCHAR = UNRESERVED | frozenset("!$&'()*+,;=:@")
MAX_DECODINGS = 4  # percent-decodings of a path after the first before it counts as ambiguous
HOSTNAME_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")
REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 414: "URI Too Long",
           429: "Too Many Requests", 431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
           505: "HTTP Version Not Supported"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HeadError(Exception):
    """The request is malformed: answered with `status` and the message, never forwarded."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Refusal(Exception):
    """The lease does not allow the request: answered 403, logged as a `warn` event."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class RequestHead:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]


@dataclass(frozen=True)
class Destination:
    tunnel: bool  # CONNECT
    scheme: str
    host: str  # lowercase; an IPv6 literal without brackets
    port: int
    authority: str  # host[:port] as matched (default port dropped, IPv6 in brackets)
    url: str  # what the lease is matched against and what messages name
    origin_form: str = "/"  # the request target sent upstream (plain HTTP)
    ip: IPAddress | None = None  # set when the host is an IP literal


# -- the request head (h11) --------------------------------------------------------------
def _protocol_error(e: h11.ProtocolError, what: str) -> HeadError:
    hint = e.error_status_hint
    return HeadError(hint if hint in REASONS else 400, f"malformed {what}: {e}")


def _text(b: bytes) -> str:
    return b.decode("latin-1")


class RequestParser:
    """One request from a job, parsed by h11 (a sans-I/O HTTP/1.1 parser): its head, then
    its body as the pieces h11 frames (Content-Length or chunked with hex sizes only).
    Nothing after the end of the body is ever parsed: the proxy stops there.

    On top of h11, rules for what a proxy must not pass on ambiguously: no obsolete line
    folding, no control characters in field values, HTTP/1.0 or HTTP/1.1 only, and no
    `Transfer-Encoding` together with `Content-Length` or in an HTTP/1.0 request."""

    def __init__(self) -> None:
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.framing: tuple[str, int] = ("none", 0)

    def head(self, data: bytes) -> RequestHead:
        """`data` is the whole head: request line, header lines, empty line."""
        lines = data.split(b"\n")
        if len(lines[0]) > MAX_REQUEST_LINE:
            raise HeadError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
        if any(line[:1] in (b" ", b"\t") for line in lines[1:]):
            raise HeadError(400, "folded header lines are not allowed")
        self.conn.receive_data(data)
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as e:
            raise _protocol_error(e, "request") from None
        if not isinstance(event, h11.Request):
            raise HeadError(400, "incomplete request head")
        version = "HTTP/" + _text(event.http_version)
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HeadError(505, f"{version[:20]} is not supported (HTTP/1.0 and HTTP/1.1 are)")
        raw = event.headers.raw_items()
        if len(raw) > MAX_HEADERS:
            raise HeadError(431, f"more than {MAX_HEADERS} header fields")
        head = RequestHead(_text(event.method), _text(event.target), version)
        for name, value in raw:
            if CONTROL_RE.search(value):
                raise HeadError(400, f"header {_text(name)[:60]!r} holds a control character")
            head.headers.append((_text(name), _text(value)))
        self.framing = body_framing(head)
        return head

    def feed(self, data: bytes) -> None:
        """More of the request's bytes. Nothing is passed on for none: h11 takes b"" as the
        end of the stream (a body that had not come with the head would then be cut short)."""
        if data:
            self.conn.receive_data(data)

    def next_body(self) -> bytes | list[tuple[str, str]] | None:
        """The next piece of the body; at its end, the trailer fields (a list, often empty);
        None while h11 needs more bytes."""
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as e:
            raise _protocol_error(e, "request body") from None
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return [(_text(k), _text(v)) for k, v in event.headers.raw_items()]
        if event is h11.NEED_DATA:
            return None
        raise HeadError(400, f"unexpected {type(event).__name__} in the request body")


def parse_head(data: bytes) -> RequestHead:
    """A whole head (request line, header lines, empty line), as the proxy reads it."""
    if len(data) > MAX_HEAD:
        raise HeadError(431, f"request head longer than {MAX_HEAD} bytes")
    return RequestParser().head(data)


# -- the request target: one meaning for every origin ---------------------------------------
def _count_special(b: bytes) -> int:
    return b.count(b".") + b.count(b"/") + b.count(b"\\")


def check_path(path: str) -> None:
    """HeadError(400) naming the reason when origins could disagree on what the path means
    (the rule the README states): a backslash, raw or `%5c`; an encoded slash `%2f`; a `%`
    not followed by two hex digits; `%c0`/`%c1` (overlong UTF-8, as in `%c0%ae` for `.`);
    a segment holding both a `;` path parameter and `..` (once decoded: `..;/`, `.%2e;x`);
    and a percent-escape left after one decoding (`%25...`) that decodes, once or more, to
    `.`, `/` or `\\` (`%252e%252e`, `%25%32%65`)."""
    if "\\" in path:
        raise HeadError(400, "ambiguous path: a backslash (origins differ on whether it is a '/')")
    if not PCT_VALID_RE.fullmatch(path):
        raise HeadError(400, "ambiguous path: a '%' not followed by two hex digits")
    low = path.lower()
    if "%5c" in low:
        raise HeadError(400, "ambiguous path: an encoded backslash (%5c)")
    if "%2f" in low:
        raise HeadError(400, "ambiguous path: an encoded slash (%2f)")
    if "%c0" in low or "%c1" in low:
        raise HeadError(400, "ambiguous path: an overlong UTF-8 escape (%c0 or %c1)")
    for seg in path.split("/"):
        if ";" in seg or "%3b" in seg.lower():
            decoded = unquote_to_bytes(seg)
            if b";" in decoded and b".." in decoded:
                raise HeadError(400, f"ambiguous path: a ';' path parameter in a '..' segment ({seg[:60]!r})")
    once = unquote_to_bytes(path)
    base = _count_special(once)
    d = once
    for depth in range(MAX_DECODINGS + 1):
        nxt = unquote_to_bytes(d)
        if nxt == d:
            return
        if _count_special(nxt) > base:
            raise HeadError(400, "ambiguous path: a double-encoded '.', '/' or '\\' (%25...)")
        if depth == MAX_DECODINGS:
            raise HeadError(400, f"ambiguous path: still percent-encoded after {MAX_DECODINGS + 1} decodings")
        d = nxt


def _segment(seg: str) -> str:
    """RFC 3986 §6.2.2 normalisation of one segment: unreserved characters decoded, other
    escapes in upper case, characters outside `pchar` escaped."""
    out: list[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "%":
            ch = chr(int(seg[i + 1:i + 3], 16))
            out.append(ch if ch in UNRESERVED else "%" + seg[i + 1:i + 3].upper())
            i += 3
            continue
        out.append(c if c in PCHAR else "".join(f"%{b:02X}" for b in c.encode("utf-8")))
        i += 1
    return "".join(out)


def canonical_path(path: str) -> str:
    """The path forwarded to the origin, after `check_path`: segments normalised, `.` and
    `..` resolved (never above the root), empty segments dropped, a trailing `/` kept.
    Fully decoded, it is the path `canonical_target` matches the lease against."""
    out: list[str] = []
    segs = path.split("/")[1:] if path.startswith("/") else path.split("/")
    trailing = False
    for seg in segs:
        norm = _segment(seg)
        trailing = norm in ("", ".", "..")
        if norm == "..":
            if out:
                out.pop()
        elif norm not in ("", "."):
            out.append(norm)
    return "/" + "/".join(out) + ("/" if trailing and out else "")


# -- where it goes ------------------------------------------------------------------------
def ip_literal(host: str) -> IPAddress | None:
    """The address an IP-literal host denotes, in any form the C library accepts
    (`127.1`, `0x7f.1`, `2130706433`, `::ffff:127.0.0.1`); None for a name."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise HeadError(400, f"malformed IPv6 address {host[:60]!r}") from None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _host_and_port(netloc: str, scheme: str, what: str) -> tuple[str, int, IPAddress | None]:
    if not netloc or any(c in netloc for c in " \t/?#\\"):
        raise HeadError(400, f"malformed {what} {netloc[:200]!r}")
    try:
        parts = urlsplit("//" + netloc)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise HeadError(400, f"malformed {what} {netloc[:200]!r}: {e}") from None
    if not host:
        raise HeadError(400, f"{what} {netloc[:200]!r} names no host")
    if "%" in host:
        raise HeadError(400, f"{what} {netloc[:200]!r}: scoped IPv6 addresses are not supported")
    ip = ip_literal(host)
    if ip is None and not HOSTNAME_RE.match(host):
        raise HeadError(400, f"{what} {netloc[:200]!r}: {host[:100]!r} is not a host name")
    if port is None:
        if scheme not in DEFAULT_PORT:
            raise HeadError(400, f"{what} {netloc[:200]!r} has no port")
        port = DEFAULT_PORT[scheme]
    if not 0 < port < 65536:
        raise HeadError(400, f"{what} {netloc[:200]!r}: port out of range")
    return host, port, ip


def _authority(host: str, port: int, scheme: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if DEFAULT_PORT.get(scheme) == port else f"{h}:{port}"


def destination_of(head: RequestHead) -> Destination:
    """Where the request goes."""
    if head.method == "CONNECT":
        host, port, ip = _host_and_port(head.target, "", "CONNECT target")
        auth = _authority(host, port, "https")
        dest = Destination(True, "https", host, port, auth, f"https://{auth}", ip=ip)
    else:
        target = head.target
        scheme, sep, rest = target.partition("://")
        if not sep:
            raise HeadError(400, f"the proxy needs an absolute URL, got {target[:200]!r}")
        scheme = scheme.lower()
        if scheme != "http":
            raise HeadError(400, f"the proxy carries plain http:// URLs; use CONNECT for {scheme[:20]}://")
        end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        netloc, tail = rest[:end], rest[end:]
        if "@" in netloc:
            raise HeadError(400, "credentials in the URL are not carried through the proxy")
        host, port, ip = _host_and_port(netloc, scheme, "URL host")
        path, qmark, query = tail.partition("#")[0].partition("?")
        check_path(path)
        origin = canonical_path(path or "/") + (qmark + query if query else "")
        auth = _authority(host, port, scheme)
        dest = Destination(False, scheme, host, port, auth, f"{scheme}://{auth}{origin}", origin, ip)
    return dest


def check_host_header(head: RequestHead, dest: Destination) -> None:
    """The `Host` header, when there is one, must name the destination's host and port."""
    hosts = head.values("host")
    if len(hosts) > 1:
        raise Refusal("PERMISSION_DENIED", "more than one Host header")
    if hosts:
        try:
            h, p, _ = _host_and_port(hosts[0], dest.scheme, "Host header")
        except HeadError as e:
            raise Refusal("PERMISSION_DENIED", e.message) from None
        if (h, p) != (dest.host, dest.port):
            raise Refusal("PERMISSION_DENIED",
                          f"Host header {hosts[0][:200]!r} does not agree with the target {dest.authority}")


# -- the lease ----------------------------------------------------------------------------
def _names_host(pattern: str) -> bool:
    """Does the pattern spell its host out (no `*` in the scheme or host segments)?"""
    segs = pattern.split("/")
    return len(segs) >= 3 and all("*" not in s for s in segs[:3])


def check_lease(authority: Authority, dest: Destination, now: float) -> bool:
    """protocol.md §8.4's order: expiry, the patterns, the budget; Refusal on the first
    that fails. Returns whether an allowing pattern names the host itself, which is
    what lets the request reach a non-global address."""
    if authority.expired(now):
        raise Refusal("LEASE_EXPIRED", "the job's lease has expired")
    patterns = [p for p in authority.lease.get("net.fetch", []) if isinstance(p, str)]
    if dest.tunnel:
        matching = [p for p in patterns if glob_match_prefix(p, dest.url)]
    else:
        canon = canonical_target("net.fetch", dest.url)
        matching = [p for p in patterns if glob_match(p, canon)]
    if not matching:
        what = "the tunnel's scheme, host and port" if dest.tunnel else "the URL"
        raise Refusal("PERMISSION_DENIED",
                      f"the job's lease (net.fetch {_show(patterns)}) does not grant {what}")
    named = any(_names_host(p) for p in matching)
    if dest.ip is not None and not named:
        raise Refusal("PERMISSION_DENIED",
                      f"{dest.host} is an IP address that no net.fetch pattern names "
                      f"(lease: net.fetch {_show(patterns)})")
    if authority.initial and authority.exhausted():
        spent = ", ".join(f"{c} {v}" for c, v in authority.remaining.items() if v <= 0)
        raise Refusal("BUDGET_EXHAUSTED", f"the job's budget is exhausted ({spent} remaining)")
    return named


def address_kind(ip: IPAddress) -> str | None:
    """Why an address is not an ordinary internet destination; None when it is one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA:
        return "metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def usable_addresses(dest: Destination, addresses: list[IPAddress], named: bool) -> list[IPAddress]:
    """The resolved addresses the proxy may connect to; Refusal when none."""
    if named:
        return addresses
    ok = [a for a in addresses if address_kind(a) is None]
    if not ok:
        kinds = sorted({address_kind(a) or "" for a in addresses})
        raise Refusal("PERMISSION_DENIED",
                      f"{dest.host} resolves to a {'/'.join(kinds)} address "
                      f"({', '.join(str(a) for a in addresses[:4])}), which only a net.fetch "
                      f"pattern naming {dest.host} may reach")
    return ok


def _show(patterns: list[str], limit: int = 1024) -> str:
    text = "[" + ", ".join(repr(p) for p in patterns) + "]"
    return text if len(text) <= limit else text[:limit] + "…]"


# -- what goes upstream and back ----------------------------------------------------------
def body_framing(head: RequestHead) -> tuple[str, int]:
    """("length", n), ("chunked", 0) or ("none", 0); ambiguous framing is refused (h11 has
    already checked each field's syntax when the head came from RequestParser)."""
    te = head.values("transfer-encoding")
    cl = head.values("content-length")
    if te:
        if cl:
            raise HeadError(400, "both Transfer-Encoding and Content-Length")
        if head.version == "HTTP/1.0":
            raise HeadError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if len(te) != 1 or te[0].strip().lower() != "chunked":
            raise HeadError(501, f"Transfer-Encoding {', '.join(te)[:100]!r} is not supported (chunked is)")
        return "chunked", 0
    if cl:
        if len(set(cl)) != 1 or not cl[0].isdigit() or len(cl[0]) > 18:
            raise HeadError(400, f"malformed Content-Length {', '.join(cl)[:60]!r}")
        return "length", int(cl[0])
    return "none", 0


def upstream_head(head: RequestHead, dest: Destination, framing: tuple[str, int] | None = None) -> bytes:
    """The request head as the origin server sees it, written afresh: the request line from
    the canonical URL (origin form), `Host` from the destination, the job's other fields
    but hop-by-hop ones and the framing, then our framing of the body and `Connection:
    close` (one request per connection)."""
    kind, length = framing if framing is not None else body_framing(head)
    listed = {t.strip().lower() for v in head.values("connection") for t in v.split(",")}
    lines = [f"{head.method} {dest.origin_form} {head.version}", f"Host: {dest.authority}"]
    for name, value in head.headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in listed or low in FRAMING:
            continue
        lines.append(f"{name}: {value}")
    if kind == "length":
        lines.append(f"Content-Length: {length}")
    elif kind == "chunked":
        lines.append("Transfer-Encoding: chunked")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a body the proxy frames as chunked (never empty: that ends the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: list[tuple[str, str]]) -> bytes:
    kept = [f"{k}: {v}\r\n" for k, v in trailers if k.lower() not in HOP_BY_HOP and k.lower() not in FRAMING]
    return ("0\r\n" + "".join(kept) + "\r\n").encode("latin-1")


_PRIMER_HOST = [("Host", "origin")]
_PRIMERS = {m: h11.Request(method=m, target="/", headers=_PRIMER_HOST)  # h11 events are immutable
            for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
_END = h11.EndOfMessage()


class ResponseParser:
    """The origin's response heads, parsed by h11: interim (1xx) ones, then the final one;
    its body is not parsed here (the proxy relays it as it comes, after `rest()`)."""

    def __init__(self, method: str) -> None:
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        # h11 reads a response in the light of its request (a HEAD's has no body): tell it
        # the method; the request itself was written by `upstream_head`.
        request = _PRIMERS.get(method) or h11.Request(method=method, target="/", headers=_PRIMER_HOST)
        self.conn.send(request)
        self.conn.send(_END)
        self.received = 0

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        self.conn.receive_data(data)

    def next_head(self) -> tuple[bytes, bool] | None:
        """(the head as the job gets it, whether it is interim), or None: h11 needs more bytes."""
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:
                raise HeadError(502, "the origin's response head is too long") from None
            raise HeadError(502, f"the origin sent a malformed response: {e}") from None
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.InformationalResponse | h11.Response):
            return response_head(event), isinstance(event, h11.InformationalResponse)
        raise HeadError(502, f"the origin sent {type(event).__name__} instead of a response head")

    def rest(self) -> bytes:
        """What the origin sent after the final head: the start of the body."""
        return bytes(self.conn.trailing_data[0])


def response_head(event: h11.InformationalResponse | h11.Response) -> bytes:
    """A response head written afresh from what h11 parsed. A final one carries
    `Connection: close` (the proxy carries one request per connection) and no
    `Content-Length` beside `Transfer-Encoding` (RFC 9112 §6.3)."""
    raw = [(_text(k), _text(v)) for k, v in event.headers.raw_items()]
    lines = [f"HTTP/{_text(event.http_version)} {event.status_code} {_text(event.reason)}".rstrip(" ")]
    if isinstance(event, h11.InformationalResponse):
        lines += [f"{k}: {v}" for k, v in raw]
    else:
        listed = {t.strip().lower() for k, v in raw if k.lower() == "connection" for t in v.split(",")}
        chunked = any(k.lower() == "transfer-encoding" for k, _ in raw)
        for name, value in raw:
            low = name.lower()
            if low in ("connection", "keep-alive", "proxy-connection") or low in listed:
                continue
            if chunked and low == "content-length":
                continue
            lines.append(f"{name}: {value}")
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_response(status: int, body: str, code: str | None = None) -> bytes:
    payload = (body.rstrip("\n") + "\n").encode("utf-8")
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
            "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(payload)}",
            "Connection: close", "Proxy-Agent: arcp-supervisor"]
    if code:
        head.append(f"X-ARCP-Error: {code}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + payload

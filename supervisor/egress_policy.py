"""The egress proxy's decisions, free of I/O: parse what a job sends, judge it by the lease.

A job whose lease holds `net.fetch` reaches the network only through the
supervisor's proxy. For each request the proxy parses the head (bounded), finds
the destination, and asks this module:

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

Default ports are dropped before matching (`http://h:80/x` is `http://h/x`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from shared.lease import canonical_target, glob_match, glob_match_prefix
from supervisor.authority import Authority

MAX_REQUEST_LINE = 8192
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
DEFAULT_PORT = {"http": 80, "https": 443}
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                        "proxy-authenticate", "te", "trailer", "upgrade"})
TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
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


# -- the request head ------------------------------------------------------------------
def parse_request_line(line: bytes) -> RequestHead:
    if len(line) > MAX_REQUEST_LINE:
        raise HeadError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise HeadError(400, "request line is not ASCII") from None
    parts = text.split(" ")
    if len(parts) != 3 or not all(parts):
        raise HeadError(400, f"malformed request line {text[:200]!r}")
    method, target, version = parts
    if not TOKEN_RE.match(method):
        raise HeadError(400, f"malformed method {method[:40]!r}")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise HeadError(505, f"{version[:20]} is not supported (HTTP/1.0 and HTTP/1.1 are)")
        raise HeadError(400, f"malformed request line {text[:200]!r}")
    return RequestHead(method, target, version)


def parse_header_line(head: RequestHead, line: bytes) -> None:
    if len(head.headers) >= MAX_HEADERS:
        raise HeadError(431, f"more than {MAX_HEADERS} header fields")
    try:
        text = line.decode("latin-1").rstrip("\r\n")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HeadError(400, "header is not text") from None
    if text[:1] in (" ", "\t"):
        raise HeadError(400, "folded header lines are not allowed")
    name, sep, value = text.partition(":")
    if not sep or not TOKEN_RE.match(name):
        raise HeadError(400, f"malformed header line {text[:100]!r}")
    if any(c in value for c in "\r\n\0"):
        raise HeadError(400, f"header {name!r} holds a control character")
    head.headers.append((name, value.strip(" \t")))


def parse_head(data: bytes) -> RequestHead:
    """A whole head (request line, header lines, empty line), as the proxy reads it."""
    if len(data) > MAX_HEAD:
        raise HeadError(431, f"request head longer than {MAX_HEAD} bytes")
    lines = data.split(b"\n")
    head = parse_request_line(lines[0])
    for line in lines[1:]:
        if line in (b"", b"\r"):
            break
        parse_header_line(head, line)
    return head


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
        tail = tail.partition("#")[0]
        origin = tail if tail.startswith("/") else "/" + tail
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
    """("length", n), ("chunked", 0) or ("none", 0); conflicting framing is refused."""
    te = head.values("transfer-encoding")
    cl = head.values("content-length")
    if te:
        if cl:
            raise HeadError(400, "both Transfer-Encoding and Content-Length")
        if len(te) != 1 or te[0].strip().lower() != "chunked":
            raise HeadError(501, f"Transfer-Encoding {', '.join(te)[:100]!r} is not supported (chunked is)")
        return "chunked", 0
    if cl:
        if len(set(cl)) != 1 or not cl[0].isdigit() or len(cl[0]) > 18:
            raise HeadError(400, f"malformed Content-Length {', '.join(cl)[:60]!r}")
        n = int(cl[0])
        return ("length", n) if n else ("none", 0)
    return "none", 0


def upstream_head(head: RequestHead, dest: Destination) -> bytes:
    """The request as the origin server sees it: origin-form target, no hop-by-hop
    fields, one request per connection."""
    listed = {t.strip().lower() for v in head.values("connection") for t in v.split(",")}
    lines = [f"{head.method} {dest.origin_form} {head.version}"]
    has_host = False
    for name, value in head.headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in listed:
            continue
        has_host = has_host or low == "host"
        lines.append(f"{name}: {value}")
    if not has_host:
        lines.append(f"Host: {dest.authority}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response_head(data: bytes) -> tuple[bytes, bool]:
    """The origin's response head with `Connection: close` (the proxy carries one request
    per connection); and whether it is an interim (1xx) response that another follows."""
    lines = data.decode("latin-1").split("\r\n") if b"\r\n" in data else data.decode("latin-1").split("\n")
    status = lines[0]
    parts = status.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise HeadError(502, f"the origin sent a malformed status line {status[:100]!r}")
    interim = parts[1].startswith("1") and parts[1] != "101"
    if interim:
        return data, True
    kept = [status]
    for line in lines[1:]:
        if not line:
            continue
        name = line.partition(":")[0].strip().lower()
        if name in ("connection", "keep-alive", "proxy-connection"):
            continue
        kept.append(line)
    kept.append("Connection: close")
    return ("\r\n".join(kept) + "\r\n\r\n").encode("latin-1"), False


def error_response(status: int, body: str, code: str | None = None) -> bytes:
    payload = (body.rstrip("\n") + "\n").encode("utf-8")
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
            "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(payload)}",
            "Connection: close", "Proxy-Agent: arcp-supervisor"]
    if code:
        head.append(f"X-ARCP-Error: {code}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + payload

"""The egress proxy's decisions, free of I/O: parse what a job sends, judge it by the lease.

A job whose lease holds `net.fetch` reaches the network only through the
supervisor's proxy. For each request the proxy reads the head (bounded), has h11
parse it (`messages.RequestParser`; h11 also frames the body, so a chunk size is
hex or the request is refused), finds the destination, and asks this module:

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
this, and what goes upstream is written afresh (`messages.upstream_head`, `chunk`): the
request line from the canonical URL, the job's fields re-emitted, the body framed
by the proxy. Nothing the job sent is forwarded as raw bytes but a body's data.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import string
from urllib.parse import unquote_to_bytes, urlsplit

from shared.lease import canonical_target, glob_match, glob_match_prefix
from supervisor.core.authority import Authority
from supervisor.egress.messages import Destination, HeadError, IPAddress, RequestHead

METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
DEFAULT_PORT = {"http": 80, "https": 443}
PCT_VALID_RE = re.compile(r"(?:[^%]|%[0-9A-Fa-f]{2})*")
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
PCHAR = UNRESERVED | frozenset("!$&'()*+,;=:@")
MAX_DECODINGS = 4  # percent-decodings of a path after the first before it counts as ambiguous
HOSTNAME_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")


class Refusal(Exception):
    """The lease does not allow the request: answered 403, logged as a `warn` event."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


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

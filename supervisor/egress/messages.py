"""HTTP/1.1 as the egress proxy speaks it, through h11 (a sans-I/O parser), free of I/O.

What a job sends is parsed by h11 and never forwarded as raw bytes: its head is
read into a `RequestHead` (`RequestParser`, with rules on top of h11 for what a
proxy must not pass on ambiguously), its body is framed by h11 and framed
afresh by the proxy (`chunk`, `last_chunk`), and what goes upstream is written
afresh from the checked destination (`upstream_head`). The origin's response
heads are parsed by h11 too and written afresh (`ResponseParser`,
`response_head`); the proxy's own answers are `error_response`. The decisions
about where a request may go are in `policy`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import h11

MAX_REQUEST_LINE = 8192
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                        "proxy-authenticate", "te", "trailer", "upgrade"})
FRAMING = frozenset({"host", "content-length", "transfer-encoding"})  # written by the proxy itself
CONTROL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
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
    """Where a request goes: its target as `policy.destination_of` parsed and checked it."""

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

"""Q-Lite: a tiny gateway that lets many people share one Ollama server safely.

One thread runs one `selectors` loop that owns every socket, all non-blocking: the listening
socket, each client connection (`Client`) and each connection to Ollama (`Upstream`). A Client
parses HTTP/1.1 requests incrementally and answers what it can itself: bad input, health,
metrics, and the 503 when every slot is busy. Every other request goes to an Upstream, which
connects without blocking, sends the request that `http.client` wrote, parses the response
head with `http.client` and decodes the body as bytes arrive. A framer re-chunks the body for
the client: one chunk per NDJSON line or SSE event, whatever chunking Ollama or the network
used. Backpressure is plain: an Upstream stops reading while its Client has too much unsent
output. Deadlines are checked by a sweep every quarter second, so a silent peer costs nothing.
"""

import argparse
import errno
import hmac
import http.client
import io
import json
import os
import posixpath
import re
import selectors
import signal
import socket
import sys
import time
import traceback
from urllib.parse import unquote, urlsplit

try:
    import resource
except ImportError:  # not on Windows
    resource = None

# ==================================================================== Configuration

MAX_HEAD = 64 * 1024      # request head; 431 beyond
MAX_HEADERS = 100         # 431 beyond
MAX_TARGET = 8 * 1024     # 414 beyond
MAX_LINE = 1024 * 1024    # a longer NDJSON line or SSE event is forwarded in pieces
HIGH_WATER = 256 * 1024   # unsent client output that pauses reading the upstream
READ_SIZE = 256 * 1024
CONNECT_TIMEOUT = 10.0    # a dead upstream host must not hold a slot for the whole upstream timeout
LINGER = 2.0              # after an error, how long a client may go on sending before we hang up
DRAIN = 30.0              # how long requests in flight may run after SIGTERM
TICK = 0.25               # deadline sweep period
HOP_BY_HOP = frozenset(["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"])
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect"}
ADMIN_PATHS = frozenset(["/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"])
TTFB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def parse_upstream(value):
    """Read an upstream the way Ollama reads OLLAMA_HOST: host, host:port or http://host:port."""
    url = urlsplit(value if "://" in value else "http://" + value)
    port = url.port  # raises ValueError when not a number in range
    if url.scheme != "http" or not url.hostname or url.path not in ("", "/") or url.query \
            or url.fragment or url.username:
        raise ValueError("upstream must look like http://host[:port], got %r" % value)
    return url.hostname, port or 11434


def number(kind, low):
    """An argparse type: a number of `kind` no smaller than `low`."""
    def convert(text):
        value = kind(text)
        if value < low:
            raise ValueError(text)
        return value
    convert.__name__ = kind.__name__
    return convert


def parse_args(argv=None):
    """The command line, with defaults from the environment the way Ollama reads it."""
    p = argparse.ArgumentParser(prog="qlite.py", description="Share one Ollama server safely.")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=number(int, 0), default=8080, help="port (default 8080)")
    p.add_argument("--upstream", default=os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434",
                   help="Ollama's address (default $OLLAMA_HOST, else http://127.0.0.1:11434)")
    p.add_argument("--max-active", type=number(int, 1), default=10,
                   help="requests in flight to Ollama; more get 503 (default 10)")
    p.add_argument("--client-timeout", type=number(float, 0.01), default=30.0, metavar="S",
                   help="most seconds to send a request or sit idle (default 30)")
    p.add_argument("--upstream-timeout", type=number(float, 0.01), default=600.0, metavar="S",
                   help="most seconds Ollama may stay silent (default 600)")
    p.add_argument("--max-body", type=number(int, 0), default=64 * 1024 * 1024, metavar="BYTES",
                   help="largest request body; 413 beyond (default 64 MiB)")
    p.add_argument("--api-key", default=os.environ.get("QLITE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default $QLITE_API_KEY)")
    p.add_argument("--allow-admin", action="store_true",
                   help="let clients pull, push, create, copy and delete models")
    p.add_argument("--quiet", action="store_true", help="no access log")
    args = p.parse_args(argv)
    if args.port > 65535:
        p.error("argument --port: %d is not a port" % args.port)
    try:
        args.upstream_host, args.upstream_port = parse_upstream(args.upstream)
    except ValueError as e:
        p.error("argument --upstream: %s" % e)
    return args


# ==================================================================== Wire helpers (no sockets)

class ProtocolError(Exception):
    """Input we will not pass on; carries the HTTP status to answer with."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status, self.headers = status, headers


def error_body(path, status, message):
    """The JSON error clients expect: Ollama's shape, or OpenAI's under /v1/."""
    if not path.startswith("/v1/"):
        return json.dumps({"error": message}).encode()
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "api_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": None}}).encode()


def response_head(status, reason, headers):
    """Serialize a response head from (name, value) pairs."""
    lines = ["HTTP/1.1 %d %s" % (status, reason)] + ["%s: %s" % h for h in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def http_date():
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())


TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+\Z")
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
HEX = b"0123456789abcdefABCDEF"


class Request:
    """A parsed request head, and what it says about its body and connection."""

    def __init__(self, method, target, version, headers):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.path = target.split("?", 1)[0]
        self.started = time.monotonic()
        tokens = {t.strip().lower() for v in self.values("connection") for t in v.split(",")}
        self.hop_by_hop = tokens  # headers the client named in Connection are hop-by-hop too
        self.keep_alive = version == "HTTP/1.1" and "close" not in tokens

    def values(self, name):
        return [v for n, v in self.headers if n.lower() == name]

    def header(self, name, default=""):
        found = self.values(name)
        return found[0] if found else default


def parse_request(head, max_body):
    """Parse a request head (up to its blank line) strictly: a Request, or ProtocolError."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not TOKEN.match(parts[0]):
        raise ProtocolError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolError(505 if re.match(r"HTTP/\d\.\d\Z", version) else 400,
                            "unsupported HTTP version")
    if method == "CONNECT":
        raise ProtocolError(405, "CONNECT is not supported: Q-Lite is not a forward proxy")
    if len(target) > MAX_TARGET:
        raise ProtocolError(414, "request target longer than %d bytes" % MAX_TARGET)
    if target[:7].lower() == "http://":  # absolute-form: served from our own upstream only
        url = urlsplit(target)
        target = (url.path or "/") + ("?" + url.query if url.query else "")
    if not target.startswith("/") or not target.isascii() or CONTROL.search(target):
        raise ProtocolError(400, "malformed request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise ProtocolError(431, "more than %d request headers" % MAX_HEADERS)
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        value = value.strip(" \t")
        if not colon or not TOKEN.match(name) or CONTROL.search(value):
            raise ProtocolError(400, "malformed header line")  # also catches obs-fold
        headers.append((name, value))
    req = Request(method, target, version, headers)
    codings, lengths = req.values("transfer-encoding"), set(req.values("content-length"))
    req.has_body = bool(codings or lengths)
    req.body = LengthReader(0)
    if codings and lengths:
        raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
    if codings:
        if ",".join(codings).lower() != "chunked":
            raise ProtocolError(501, "only the chunked transfer-encoding is supported")
        req.body = ChunkedReader(limit=max_body)
    elif lengths:
        length = lengths.pop()
        if lengths or not (length.isascii() and length.isdigit()) or len(length) > 18:
            raise ProtocolError(400, "bad Content-Length")
        if int(length) > max_body:
            raise ProtocolError(413, "request body larger than %d bytes" % max_body)
        req.body = LengthReader(int(length))
    return req


def admin_path(path):
    """Whether a path manages models, judged after the decoding Ollama's router does."""
    clean = "/" + posixpath.normpath(unquote(path)).lstrip("/")
    return clean in ADMIN_PATHS or clean.startswith("/api/blobs")


class LengthReader:
    """Incremental reader of a body with a known length."""

    def __init__(self, length):
        self.left, self.done, self.rest = length, length == 0, b""

    def feed(self, data):
        piece = data[:self.left]
        self.left -= len(piece)
        if not self.left:
            self.done, self.rest = True, data[len(piece):]
        return piece


class CloseReader:
    """A body that ends when the connection does."""
    done, rest = False, b""

    def feed(self, data):
        return data


class ChunkedReader:
    """Incremental decoder of a chunked body; bad framing raises ProtocolError."""

    def __init__(self, limit=None):
        self.pending = b""       # an incomplete size line, chunk end or trailer
        self.left = 0            # payload bytes still due in the current chunk
        self.size, self.limit = 0, limit
        self.chunk_end_due = self.trailer = self.done = False
        self.rest = b""

    def feed(self, data):
        out = []
        try:
            self.decode(data, out)
        except ProtocolError as e:
            e.decoded = b"".join(out)  # what came before the bad framing still goes out
            raise
        return b"".join(out)

    def decode(self, data, out):
        if self.pending:
            data, self.pending = self.pending + data, b""
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self.left:
                piece = data[pos:pos + self.left]
                out.append(piece)
                pos += len(piece)
                self.left -= len(piece)
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > 1024:
                    raise ProtocolError(400, "chunk size line too long")
                self.pending = data[pos:]
                break
            line, pos = data[pos:eol], eol + 2
            if self.chunk_end_due:  # the CRLF after a chunk's data reads as an empty line
                if line:
                    raise ProtocolError(400, "chunk longer than its size")
                self.chunk_end_due = False
            elif self.trailer:
                self.done, self.rest = not line, data[pos:]
            else:
                size = line.split(b";", 1)[0].rstrip(b" \t")
                if not size or len(size) > 15 or size.strip(HEX):
                    raise ProtocolError(400, "bad chunk size")
                self.left = int(size, 16)
                self.chunk_end_due, self.trailer = self.left > 0, self.left == 0
                self.size += self.left
                if self.limit is not None and self.size > self.limit:
                    raise ProtocolError(413, "request body larger than %d bytes" % self.limit)


class PlainFramer:
    """A body framed by Content-Length or by closing: bytes pass as they are; failure cuts."""

    def frame(self, data):
        return data

    def finish(self):
        return b""

    def fail(self, message):
        return None


class ChunkFramer(PlainFramer):
    """Chunked, one chunk per read; failure leaves out the last chunk so clients see truncation."""

    def frame(self, data):
        return b"%x\r\n%s\r\n" % (len(data), data) if data else b""

    def finish(self):
        return b"0\r\n\r\n"


class RecordFramer(ChunkFramer):
    """Chunked, exactly one chunk per record: an NDJSON line or an SSE event."""

    def __init__(self, separator, error_template):
        self.sep, self.error_template = separator, error_template
        self.partial = b""     # the start of a record whose end has not arrived
        self.broken = False    # part of an over-long record was sent without its end
        self.last = b""        # the last whole record, for the metrics of the final `done` line

    def frame(self, data):
        if self.partial:
            data = self.partial + data
        cut = data.rfind(self.sep)
        if cut < 0:
            self.partial = data
            return self.overflow()
        cut += len(self.sep)
        records, self.partial = data[:cut].split(self.sep), data[cut:]
        records.pop()  # what follows the last separator is self.partial
        self.last, self.broken, sep, extra = records[-1], False, self.sep, len(self.sep)
        return b"".join([b"%x\r\n%s%s\r\n" % (len(r) + extra, r, sep) for r in records]) \
            + self.overflow()

    def overflow(self):
        """Send an over-long unfinished record on, so memory stays bounded."""
        if len(self.partial) <= MAX_LINE:
            return b""
        piece, self.partial, self.broken = self.partial, b"", True
        return ChunkFramer.frame(self, piece)

    def finish(self):
        return ChunkFramer.frame(self, self.partial) + b"0\r\n\r\n"

    def fail(self, message):
        record = self.error_template % json.dumps(message).encode()
        return ChunkFramer.frame(self, (self.sep if self.broken else b"") + record) + b"0\r\n\r\n"


def ndjson_framer():
    return RecordFramer(b"\n", b'{"error": %s}\n')


def sse_framer():
    return RecordFramer(b"\n\n", b'data: {"error": {"message": %s, "type": "api_error"}}\n\n')


def plan_response(resp, req):
    """Choose the client's head and framing for an upstream response: (head, framer, keep_alive)."""
    headers = [(k, v) for k, v in resp.getheaders()
               if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
    keep_alive, framer = req.keep_alive, PlainFramer()
    if resp.length is not None:  # a known length, or no body at all (HEAD, 204, 304)
        if resp.length or "content-length" in resp.headers:
            headers.append(("Content-Length", resp.headers.get("content-length", resp.length)))
    else:
        headers.append(("X-Accel-Buffering", "no"))
        kind = resp.getheader("content-type", "").split(";")[0].strip().lower()
        if req.version == "HTTP/1.0":
            keep_alive = False  # close-delimited: an HTTP/1.0 client cannot read chunks
        else:
            headers.append(("Transfer-Encoding", "chunked"))
            framer = {"application/x-ndjson": ndjson_framer,
                      "text/event-stream": sse_framer}.get(kind, ChunkFramer)()
    if not keep_alive:
        headers.append(("Connection", "close"))
    return response_head(resp.status, resp.reason, headers), framer, keep_alive


class RequestWriter(http.client.HTTPConnection):
    """http.client writes the upstream request; we keep the bytes instead of sending them."""

    def send(self, data):
        self.wire.append(bytes(data))


def upstream_request(req, body, host_header, strip_authorization):
    """The bytes of the request to send upstream: end-to-end headers, our Host, a length."""
    writer = RequestWriter("upstream")
    writer.wire = []
    writer.putrequest(req.method, req.target, skip_host=True, skip_accept_encoding=True)
    writer.putheader("Host", host_header)
    for name, value in req.headers:
        lower = name.lower()
        if lower in NOT_FORWARDED or lower in req.hop_by_hop or lower.startswith("proxy-") \
                or (strip_authorization and lower == "authorization"):
            continue
        writer.putheader(name, value)
    if req.has_body:
        writer.putheader("Content-Length", str(len(body)))
    writer.endheaders(body if req.has_body else None)
    return b"".join(writer.wire)


class HeadSocket:
    """Lets http.client.HTTPResponse parse a response head that is already in memory."""

    def __init__(self, data):
        self.data = data

    def makefile(self, mode):
        return io.BytesIO(self.data)


def parse_response_head(head, method):
    """Parse an upstream response head with http.client; ProtocolError(502) when it cannot."""
    resp = http.client.HTTPResponse(HeadSocket(head), method=method)
    try:
        resp.begin()
    except (http.client.HTTPException, ValueError) as e:
        raise ProtocolError(502, "upstream sent a malformed response head (%s)" % type(e).__name__)
    return resp


class Metrics:
    """Exact counters for /qlite/metrics, updated as requests end."""

    def __init__(self):
        self.codes, self.rejected, self.upstream_errors, self.response_bytes = {}, 0, 0, 0
        self.ttfb_counts, self.ttfb_sum = [0] * (len(TTFB_BUCKETS) + 1), 0.0
        self.tokens, self.eval_seconds = 0, 0.0

    def observe_ttfb(self, seconds):
        self.ttfb_sum += seconds
        self.ttfb_counts[sum(1 for b in TTFB_BUCKETS if seconds > b)] += 1

    def observe_done_line(self, line):
        """Count generated tokens from the last line of an NDJSON stream."""
        try:
            final = json.loads(line)
            if final.get("done") is True:
                self.tokens += int(final.get("eval_count", 0))
                self.eval_seconds += int(final.get("eval_duration", 0)) / 1e9
        except (ValueError, TypeError, AttributeError):
            pass

    def render(self, active, max_active):
        out = ["# TYPE qlite_active_requests gauge", "qlite_active_requests %d" % active,
               "# TYPE qlite_max_active_requests gauge", "qlite_max_active_requests %d" % max_active,
               "# TYPE qlite_requests_total counter"]
        out += ['qlite_requests_total{code="%d"} %d' % kv for kv in sorted(self.codes.items())]
        out += ["# TYPE qlite_rejected_total counter", "qlite_rejected_total %d" % self.rejected,
                "# TYPE qlite_upstream_errors_total counter",
                "qlite_upstream_errors_total %d" % self.upstream_errors,
                "# TYPE qlite_response_bytes_total counter",
                "qlite_response_bytes_total %d" % self.response_bytes,
                "# TYPE qlite_time_to_first_byte_seconds histogram"]
        total = 0
        for bound, count in zip(TTFB_BUCKETS + ("+Inf",), self.ttfb_counts):
            total += count
            out.append('qlite_time_to_first_byte_seconds_bucket{le="%s"} %d' % (bound, total))
        out += ["qlite_time_to_first_byte_seconds_sum %r" % self.ttfb_sum,
                "qlite_time_to_first_byte_seconds_count %d" % total,
                "# TYPE qlite_generated_tokens_total counter",
                "qlite_generated_tokens_total %d" % self.tokens,
                "# TYPE qlite_generation_seconds_total counter",
                "qlite_generation_seconds_total %r" % self.eval_seconds]
        return ("\n".join(out) + "\n").encode()


# ==================================================================== The client connection

class Client:
    """One client connection: reads requests in order, answers or forwards each, writes back."""

    def __init__(self, gw, sock, addr):
        self.gw, self.sock, self.addr = gw, sock, "%s:%s" % addr[:2]
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.request = None      # the request being read or served
        self.upstream = None     # the Upstream serving it
        self.status = None       # status of the response under way, once its head is queued
        self.first_byte = None   # when the response's first byte was queued
        self.sent = 0            # bytes of the response under way
        self.closing = False     # hang up once the output is flushed
        self.lingering = False   # output sent and our side shut: discard input until EOF
        self.closed = False
        self.events = 0
        self.deadline = time.monotonic() + gw.args.client_timeout  # to receive a whole request
        self.stall_deadline = float("inf")                         # to take pending output
        gw.clients.add(self)
        self.set_interest()

    # ---- events
    def on_event(self, mask):
        if mask & selectors.EVENT_READ:
            self.on_readable()
        if mask & selectors.EVENT_WRITE and not self.closed:
            self.flush()

    def on_readable(self):
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return self.close()  # client gone: close() also cancels its upstream
        if self.lingering:
            return
        self.inbuf += data
        self.advance()
        self.set_interest()

    def on_timeout(self, now):
        if self.lingering or now > self.stall_deadline or (self.request is None and not self.inbuf):
            self.close()  # done lingering, not reading its output, or idle between requests
        else:
            self.fail(ProtocolError(408, "request not received within %gs"
                                    % self.gw.args.client_timeout))

    # ---- requests
    def advance(self):
        """Start the requests waiting in inbuf, in order, until one is in flight or bytes run out."""
        try:
            while not self.closing and self.upstream is None:
                if self.request is None and not self.read_head():
                    return
                if not self.read_body():
                    return
                self.dispatch()
        except ProtocolError as e:
            self.fail(e)

    def read_head(self):
        end = self.inbuf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(self.inbuf) > MAX_HEAD:
                raise ProtocolError(431, "request head larger than %d bytes" % MAX_HEAD)
            return False
        head = bytes(self.inbuf[:end])
        del self.inbuf[:end + 4]
        self.request = req = parse_request(head, self.gw.args.max_body)
        self.body_parts = []
        self.gw.check_access(req)
        if req.header("expect").lower() == "100-continue" and not req.body.done and not self.inbuf:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n", count=False)  # curl waits 1 s otherwise
        return True

    def read_body(self):
        reader = self.request.body
        if not reader.done and self.inbuf:
            data = bytes(self.inbuf)
            self.inbuf.clear()
            self.body_parts.append(reader.feed(data))
            self.inbuf += reader.rest  # the start of a pipelined request, if any
        return reader.done

    def dispatch(self):
        """The whole request is here: answer it ourselves or send it upstream."""
        gw, req = self.gw, self.request
        self.deadline = float("inf")
        if req.path.startswith("/qlite/"):  # our own endpoints are never forwarded
            if req.path not in gw.local_routes:
                return self.respond_error(404, "no such Q-Lite endpoint")
            if req.method not in ("GET", "HEAD"):
                return self.respond_error(405, "use GET", [("Allow", "GET, HEAD")])
            return self.respond(*gw.local_routes[req.path]())
        if gw.active >= gw.args.max_active:
            gw.metrics.rejected += 1
            return self.respond_error(503, "all %d slots are busy, retry shortly"
                                      % gw.args.max_active, [("Retry-After", "1")])
        body = b"".join(self.body_parts)
        self.body_parts = None
        wire = upstream_request(req, body, gw.upstream_host_header, gw.args.api_key is not None)
        self.upstream = Upstream(gw, self, wire, req.method)

    # ---- responses
    def respond(self, status, body, content_type="application/json", extra=(), close=False):
        """Answer the current request ourselves."""
        req = self.request
        close = close or req is None or not req.keep_alive
        headers = [("Content-Type", content_type), ("Content-Length", len(body)),
                   ("Date", http_date())] + list(extra) + ([("Connection", "close")] if close else [])
        head = response_head(status, http.client.responses.get(status, ""), headers)
        self.start_response(status, head + (b"" if req and req.method == "HEAD" else body))
        self.end_response(close)

    def respond_error(self, status, message, extra=(), close=False):
        path = self.request.path if self.request else ""
        self.respond(status, error_body(path, status, message), extra=extra, close=close)

    def fail(self, error):
        """Answer bad input and hang up: we cannot know where the next request would start."""
        self.respond_error(error.status, str(error), error.headers, close=True)

    def start_response(self, status, data):
        self.status, self.first_byte = status, time.monotonic()
        self.write(data)

    def end_response(self, close):
        """The response is queued whole: log it, then hang up or wait for the next request."""
        self.gw.log_request(self, self.status)
        self.request = self.status = None
        self.sent = 0
        if self.closed:
            return
        if close or self.gw.draining:
            self.closing = True
            self.set_interest()
        else:
            self.deadline = time.monotonic() + self.gw.args.client_timeout

    def upstream_done(self, tail, close=False):
        """The upstream has ended; tail ends the body, or None cuts it short."""
        self.upstream = None
        if tail is None:
            self.end_response(True)
            return self.close()
        self.write(tail)
        self.end_response(close)
        if not self.closed:
            self.advance()
            self.set_interest()

    # ---- output
    def write(self, data, count=True):
        """Queue bytes for the client and send at once what the socket takes."""
        if count:
            self.sent += len(data)
            self.gw.metrics.response_bytes += len(data)
        if self.closed:
            return
        if self.outbuf:
            self.outbuf += data
        else:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return self.close()
            if sent < len(data):
                self.outbuf += memoryview(data)[sent:]
                self.stall_deadline = time.monotonic() + self.gw.args.client_timeout
                self.set_interest()
        if len(self.outbuf) > HIGH_WATER and self.upstream:
            self.upstream.pause()

    def flush(self):
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.close()
        del self.outbuf[:sent]
        self.stall_deadline = time.monotonic() + self.gw.args.client_timeout
        if not self.outbuf:
            self.stall_deadline = float("inf")
            if self.upstream:
                self.upstream.resume()
        self.set_interest()

    def set_interest(self):
        """Read unless our side is done or pipelined input piles up; write while output waits."""
        if self.closed:
            return
        if self.closing and not self.outbuf and not self.lingering:
            return self.linger()
        busy = self.upstream is not None or self.closing
        want = 0 if (busy and len(self.inbuf) > MAX_HEAD) else selectors.EVENT_READ
        if self.outbuf:
            want |= selectors.EVENT_WRITE
        if want != self.events:
            self.gw.set_events(self.sock, self.events, want, self)
            self.events = want

    def linger(self):
        """Shut our side and read until the client hangs up, so a reset cannot eat our answer."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self.close()
        self.lingering = True
        self.deadline = time.monotonic() + LINGER
        self.inbuf.clear()
        self.set_interest()

    def close(self):
        if self.closed:
            return
        self.closed = self.closing = True
        if self.request is not None and self.status is None or self.upstream:
            self.gw.log_request(self, self.status if self.upstream is None else 499)
        if self.upstream:
            self.upstream.close()  # Ollama cancels the generation when we hang up
            self.upstream = None
        self.gw.set_events(self.sock, self.events, 0, self)
        self.sock.close()
        self.gw.clients.discard(self)


# ==================================================================== The upstream connection

class Upstream:
    """One request forwarded to Ollama: connect, send, read the head, stream the body back."""

    def __init__(self, gw, client, wire, method):
        self.gw, self.client, self.method = gw, client, method
        self.out = memoryview(wire)
        self.head = bytearray()
        self.response = self.reader = self.framer = None
        self.keep_alive = True
        self.paused = self.closed = False
        self.sock = socket.socket(gw.upstream_family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.connect_ex(gw.upstream_addr)  # in progress; a refusal shows when we send
        self.deadline = time.monotonic() + min(CONNECT_TIMEOUT, gw.args.upstream_timeout)
        gw.active += 1
        gw.upstreams.add(self)
        gw.sel.register(self.sock, selectors.EVENT_WRITE, self)

    def on_event(self, mask):
        try:
            if self.out:
                self.send()
            elif mask & selectors.EVENT_READ:
                self.receive()
        except ProtocolError as e:
            if getattr(e, "decoded", b"") and not self.closed:
                self.client.write(self.framer.frame(e.decoded))
            self.fail(e.status, str(e))
        except OSError as e:
            self.fail(502, "upstream connection failed: %s" % (e.strerror or e))

    def send(self):
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        self.out = self.out[sent:]
        if not self.out:
            self.deadline = time.monotonic() + self.gw.args.upstream_timeout
            self.gw.sel.modify(self.sock, selectors.EVENT_READ, self)

    def receive(self):
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            if isinstance(self.reader, CloseReader):
                return self.finish()
            raise ProtocolError(502, "upstream closed the connection early")
        self.deadline = time.monotonic() + self.gw.args.upstream_timeout
        if self.response is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    raise ProtocolError(502, "upstream response head too large")
                return
            self.start(bytes(self.head[:end + 4]))
            data = bytes(self.head[end + 4:])
            self.head = None
        self.client.write(self.framer.frame(self.reader.feed(data)))
        if self.reader.done and not self.closed:
            self.finish()

    def start(self, head):
        """The response head is here: choose how to read the body and how to frame it."""
        resp = self.response = parse_response_head(head, self.method)
        self.keep_alive = not resp.will_close
        if resp.chunked:
            self.reader = ChunkedReader()
        elif resp.length is not None:
            self.reader = LengthReader(resp.length)
        else:
            self.reader = CloseReader()
        head, self.framer, self.client_keep_alive = plan_response(resp, self.client.request)
        self.gw.metrics.observe_ttfb(time.monotonic() - self.client.request.started)
        self.client.start_response(resp.status, head)

    def finish(self):
        tail = self.framer.finish()
        if isinstance(self.framer, RecordFramer) and self.framer.sep == b"\n":
            self.gw.metrics.observe_done_line(self.framer.last)
        self.close()
        self.client.upstream_done(tail, not self.client_keep_alive)

    def fail(self, status, message):
        """Tell the client: an error response before the head, a last record or a cut after it."""
        if self.closed:
            return
        self.gw.metrics.upstream_errors += 1
        self.close()
        if self.response is None:
            self.client.upstream = None
            self.client.respond_error(status, message)
            self.client.advance()
            self.client.set_interest()
        else:
            self.client.upstream_done(self.framer.fail(message), not self.client_keep_alive)

    def on_timeout(self, now):
        if self.out:
            self.fail(504, "could not connect to the upstream in time")
        else:
            self.fail(504, "upstream silent for %gs" % self.gw.args.upstream_timeout)

    def pause(self):
        """The client has too much unsent output: stop reading until it drains."""
        if not self.paused and not self.closed and not self.out:
            self.paused, self.deadline = True, float("inf")
            self.gw.sel.unregister(self.sock)

    def resume(self):
        if self.paused and not self.closed:
            self.paused = False
            self.deadline = time.monotonic() + self.gw.args.upstream_timeout
            self.gw.sel.register(self.sock, selectors.EVENT_READ, self)

    def close(self):
        """Hang up and free the slot, exactly once, whatever ended the request."""
        if self.closed:
            return
        self.closed = True
        self.gw.active -= 1
        self.gw.upstreams.discard(self)
        if not self.paused:
            self.gw.sel.unregister(self.sock)
        self.sock.close()


# ==================================================================== The loop

class Gateway:
    """The listening socket, the selector, the slot count, the counters and the loop."""

    def __init__(self, args):
        self.args, self.metrics = args, Metrics()
        self.sel = selectors.DefaultSelector()
        self.clients, self.upstreams = set(), set()
        self.active = 0
        self.stop_requested = self.draining = False
        self.accept_paused_until = self.drain_deadline = None
        host, port = args.upstream_host, args.upstream_port
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # once, at start-up
        self.upstream_family, self.upstream_addr = info[0][0], info[0][4]
        self.upstream_host_header = "%s:%d" % ("[%s]" % host if ":" in host else host, port)
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        self.listener = socket.create_server((args.host, args.port), family=family, backlog=1024)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, self)
        self.local_routes = {"/qlite/health": self.health, "/qlite/metrics": self.metrics_page}

    def on_event(self, mask):
        """The listener is readable: accept what waits."""
        for _ in range(64):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors: pause accepting instead of spinning
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.sel.unregister(self.listener)
                    self.accept_paused_until = time.monotonic() + TICK
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            Client(self, sock, addr)

    def set_events(self, sock, old, new, handler):
        if not old:
            self.sel.register(sock, new, handler)
        elif not new:
            self.sel.unregister(sock)
        else:
            self.sel.modify(sock, new, handler)

    def check_access(self, req):
        """Refuse, before reading its body, a request that the key or the admin lock forbids."""
        key = self.args.api_key
        preflight = req.method == "OPTIONS" and req.header("access-control-request-method")
        if key and req.path != "/qlite/health" and not preflight and not hmac.compare_digest(
                req.header("authorization").encode("latin-1"), ("Bearer " + key).encode()):
            raise ProtocolError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                [("WWW-Authenticate", "Bearer")])
        if admin_path(req.path) and not self.args.allow_admin:
            raise ProtocolError(403, "model management is disabled on this gateway; "
                                     "start qlite.py with --allow-admin to allow it")

    def health(self):
        return 200, json.dumps({
            "status": "draining" if self.draining else "ok", "active": self.active,
            "max_active": self.args.max_active, "upstream": "http://" + self.upstream_host_header,
        }).encode()

    def metrics_page(self):
        page = self.metrics.render(self.active, self.args.max_active)
        return 200, page, "text/plain; version=0.0.4; charset=utf-8"

    def log_request(self, client, status):
        """Count a finished request and write its access-log line."""
        self.metrics.codes[status] = self.metrics.codes.get(status, 0) + 1
        if self.args.quiet:
            return
        req, now = client.request, time.monotonic()
        started = req.started if req else now
        ttfb = "%.3fs" % (client.first_byte - started) if client.first_byte else "-"
        sys.stderr.write('%s "%s %s" %d %dB ttfb=%s %.3fs\n' % (
            client.addr, req.method if req else "-", req.target if req else "-", status,
            client.sent, ttfb, now - started))

    def run(self):
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        next_sweep = 0.0
        while not self.draining or (self.clients and time.monotonic() < self.drain_deadline):
            for key, mask in self.sel.select(TICK):
                try:
                    key.data.on_event(mask)
                except Exception:  # a bug hurts one connection, never the loop
                    traceback.print_exc()
                    victim = getattr(key.data, "client", key.data)
                    if victim is not self:
                        victim.close()
            now = time.monotonic()
            if self.stop_requested and not self.draining:
                self.drain(now)
            if now >= next_sweep:
                self.sweep(now)
                next_sweep = now + TICK
        return 0

    def sweep(self, now):
        """Time out whatever has waited too long; start accepting again after a pause."""
        if self.accept_paused_until and now >= self.accept_paused_until and not self.draining:
            self.accept_paused_until = None
            self.sel.register(self.listener, selectors.EVENT_READ, self)
        for conn in [c for c in self.clients if now > min(c.deadline, c.stall_deadline)] + \
                [u for u in self.upstreams if now > u.deadline]:
            if not conn.closed:
                conn.on_timeout(now)

    def on_signal(self, signum, frame):
        if self.stop_requested:
            raise SystemExit(1)  # a second signal: stop now
        self.stop_requested = True

    def drain(self, now):
        """Stop listening, let requests in flight finish (at most DRAIN seconds), then exit."""
        self.draining, self.drain_deadline = True, now + DRAIN
        if not self.accept_paused_until:
            self.sel.unregister(self.listener)
        self.listener.close()
        for client in list(self.clients):
            if client.request is None and not client.outbuf:
                client.close()


def raise_open_file_limit():
    """A thousand idle connections need descriptors: lift the soft limit to the hard one."""
    if resource is not None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def main(argv=None):
    args = parse_args(argv)
    raise_open_file_limit()
    try:
        gw = Gateway(args)
    except socket.gaierror as e:
        sys.stderr.write("qlite: cannot resolve upstream %r: %s\n" % (args.upstream_host, e))
        return 1
    except OSError as e:
        sys.stderr.write("qlite: cannot listen on %s:%d: %s\n" % (args.host, args.port,
                                                                  e.strerror or e))
        return 1
    host, port = gw.listener.getsockname()[:2]
    warning = ""
    if not args.api_key and host not in ("127.0.0.1", "::1", "localhost"):
        warning = " (no --api-key: anyone who can reach this port can use the model)"
    sys.stderr.write("qlite: listening on http://%s:%d, upstream http://%s, max %d active%s\n"
                     % (host, port, gw.upstream_host_header, args.max_active, warning))
    sys.stderr.flush()
    return gw.run()


if __name__ == "__main__":
    sys.exit(main())

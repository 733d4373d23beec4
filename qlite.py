"""Q-Lite: a tiny gateway that lets many people share one Ollama server safely.

One thread runs one `selectors` loop that owns every socket, all non-blocking: the listener,
each client connection (`Client`) and each connection to Ollama (`Upstream`). A Client parses
HTTP/1.1 requests incrementally and answers what it can itself: bad input, its own endpoints and
the 503 when every slot is busy. Every other request goes to an Upstream, which connects without
blocking (or reuses an idle kept-alive connection), sends the request that `http.client` wrote,
parses the response head with `http.client` and decodes the body as bytes arrive. A framer
re-chunks the body for the client: one chunk per NDJSON line or SSE event, whatever chunking
Ollama or the network used. An Upstream stops reading while its Client has too much unsent
output, and deadlines are checked by a sweep four times a second, so a silent peer costs nothing.
"""

import argparse, errno, hmac, http.client, io, json, os, posixpath, re, resource
import selectors, signal, socket, sys, time, traceback, types
from urllib.parse import unquote, urlsplit

# ================================================================================ Configuration

MAX_HEAD = 64 * 1024        # request head; 431 beyond
MAX_HEADERS = 100           # 431 beyond
MAX_TARGET = 8 * 1024       # 414 beyond
MAX_LINE = 1024 * 1024      # a longer NDJSON line or SSE event is forwarded in pieces
HIGH_WATER = 256 * 1024     # unsent client output that pauses reading the upstream
READ_SIZE = 256 * 1024
CONNECT_TIMEOUT = 10.0      # a dead upstream host must not hold a slot for the whole timeout
LINGER = 2.0                # after our last byte, how long a client may go on sending
DRAIN = 30.0                # how long requests in flight may run after SIGTERM
TICK = 0.25                 # deadline sweep period
HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect"}
ADMIN_PATHS = {"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"}
TTFB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE

def parse_upstream(value):
    """Read an upstream the way Ollama reads OLLAMA_HOST: host, host:port or http://host:port."""
    url = urlsplit(value if "://" in value else "http://" + value)
    port = url.port  # ValueError when not a port number
    if url.scheme != "http" or not url.hostname or url.path not in ("", "/") or url.query \
            or url.fragment or url.username:
        raise ValueError("upstream must look like http://host[:port], got %r" % value)
    return url.hostname, port or 11434

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="qlite.py", description="Share one Ollama server safely.")
    add = p.add_argument
    add("--host", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    add("--port", type=int, default=8080, help="port to listen on (8080)")
    add("--upstream", default=os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434",
        help="Ollama's address ($OLLAMA_HOST, else http://127.0.0.1:11434)")
    add("--max-active", type=int, default=10, help="requests in flight; more get 503 (10)")
    add("--client-timeout", type=float, default=30.0, metavar="S",
        help="most seconds to send a request, sit idle or stop reading (30)")
    add("--upstream-timeout", type=float, default=600.0, metavar="S",
        help="most seconds Ollama may stay silent (600)")
    add("--max-body", type=int, default=64 << 20, metavar="BYTES",
        help="largest request body; 413 beyond (64 MiB)")
    add("--api-key", default=os.environ.get("QLITE_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' ($QLITE_API_KEY)")
    add("--allow-admin", action="store_true", help="let clients pull, push, create, copy, delete")
    add("--quiet", action="store_true", help="no access log")
    args = p.parse_args(argv)
    for flag, ok in (("port", 0 <= args.port <= 65535), ("max-active", args.max_active > 0),
                     ("client-timeout", args.client_timeout > 0), ("max-body", args.max_body >= 0),
                     ("upstream-timeout", args.upstream_timeout > 0)):
        if not ok:
            p.error("argument --%s: out of range" % flag)
    try:
        args.upstream_host, args.upstream_port = parse_upstream(args.upstream)
    except ValueError as e:
        p.error("argument --upstream: %s" % e)
    return args


# ================================================================================ Wire helpers

class ProtocolError(Exception):
    """Input we will not pass on, with the HTTP status (and headers) to answer it with."""
    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status, self.headers = status, headers

def error_body(path, status, message):
    """The JSON error clients expect: Ollama's shape, or OpenAI's under /v1/."""
    if not path.startswith("/v1/"):
        return json.dumps({"error": message}).encode()
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "api_error")
    error = {"message": message, "type": kind, "param": None, "code": None}
    return json.dumps({"error": error}).encode()

def response_head(status, reason, headers):
    lines = ["HTTP/1.1 %d %s" % (status, reason)] + ["%s: %s" % h for h in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+\Z")
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

class Request:
    """A parsed request head: what it asks for, how its body comes, whether to keep alive."""
    def __init__(self, method, target, version, headers):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.path, self.started = target.split("?", 1)[0], time.monotonic()
        self.fields = {}  # lower-cased name: its values
        for name, value in headers:
            self.fields.setdefault(name.lower(), []).append(value)
        self.connection = {t.strip().lower() for v in self.values("connection") for t in v.split(",")}
        self.keep_alive = version == "HTTP/1.1" and "close" not in self.connection
        self.body, self.has_body = LengthReader(0), False

    def values(self, name):
        return self.fields.get(name, [])

    def header(self, name):
        return next(iter(self.values(name)), "")

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
    if not target.startswith("/") or not (target.isascii() and target.isprintable()):
        raise ProtocolError(400, "malformed request target")
    if len(lines) > MAX_HEADERS + 1:
        raise ProtocolError(431, "more than %d request headers" % MAX_HEADERS)
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        value = value.strip(" \t")
        if not colon or not TOKEN.match(name) or CONTROL.search(value):
            raise ProtocolError(400, "malformed header line")  # also obs-fold, space before colon
        headers.append((name, value))
    req = Request(method, target, version, headers)
    codings, lengths = req.values("transfer-encoding"), set(req.values("content-length"))
    req.has_body = bool(codings or lengths)
    if codings and lengths:
        raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
    if codings:
        if ",".join(codings).lower() != "chunked":
            raise ProtocolError(501, "only the chunked transfer-encoding is supported")
        req.body = ChunkedReader(max_body)
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
    """Reads a body of known length (None: until the connection closes); `rest` comes after it."""
    def __init__(self, length):
        self.left, self.done, self.rest = length, length == 0, b""

    def feed(self, data):
        if self.left is None:
            return data
        piece = data[:self.left]
        self.left -= len(piece)
        if not self.left:
            self.done, self.rest = True, data[len(piece):]
        return piece

class ChunkedReader:
    """Decodes a chunked body as bytes arrive; bad framing raises ProtocolError."""
    def __init__(self, limit=None):
        self.pending = self.rest = b""   # pending: an unfinished size line, chunk end or trailer
        self.left = self.size = 0        # left: payload bytes still due in this chunk
        self.limit = limit
        self.chunk_end_due = self.trailer = self.done = False

    def feed(self, data):
        out = []
        try:
            self.decode(self.pending + data if self.pending else data, out)
        except ProtocolError as e:
            e.decoded = b"".join(out)  # what came before the bad framing still goes out
            raise
        return b"".join(out)

    def decode(self, data, out):
        pos, end, self.pending = 0, len(data), b""
        while pos < end and not self.done:
            if self.left:
                out.append(data[pos:pos + self.left])
                taken = min(self.left, end - pos)
                pos, self.left = pos + taken, self.left - taken
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > 1024:
                    raise ProtocolError(400, "chunk size line too long")
                self.pending = data[pos:]
                return
            line, pos = data[pos:eol], eol + 2
            if self.chunk_end_due:  # the CRLF after a chunk's data reads as an empty line
                if line:
                    raise ProtocolError(400, "chunk longer than its size")
                self.chunk_end_due = False
            elif self.trailer:
                self.done, self.rest = not line, data[pos:]
            else:
                size = line.split(b";", 1)[0].rstrip(b" \t")
                if not size or len(size) > 15 or size.strip(b"0123456789abcdefABCDEF"):
                    raise ProtocolError(400, "bad chunk size")
                self.left = int(size, 16)
                self.chunk_end_due, self.trailer = self.left > 0, self.left == 0
                self.size += self.left
                if self.limit is not None and self.size > self.limit:
                    raise ProtocolError(413, "request body larger than %d bytes" % self.limit)

def chunk(data):
    """One chunk of a chunked body; never the empty chunk, which would end the body."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""

class Framer:
    """Frames a body for the client: as it is, chunked per read, or one chunk per record.

    Records are NDJSON lines or SSE events; each leaves as exactly one chunk the moment its
    separator arrives. On failure a record stream ends with an error record and a proper last
    chunk; any other body is cut short (None), so the client sees the truncation.
    """

    def __init__(self, chunked, sep=b"", error_template=None):
        self.chunked, self.sep, self.error_template = chunked, sep, error_template
        self.partial = self.last = b""  # a record still missing its end; the last whole record
        self.broken = False             # part of an over-long record went out without its end

    def frame(self, data):
        if not self.sep:
            return chunk(data) if self.chunked else data
        if self.partial:
            data = self.partial + data
        cut = data.rfind(self.sep)
        if cut >= 0:
            cut += len(self.sep)
            records, self.partial = data[:cut].split(self.sep), data[cut:]
            records.pop()  # the empty string after the last separator
            self.last, self.broken, n = records[-1], False, len(self.sep)
            pieces = [self.sep + b"\r\n"] * (3 * len(records))  # size, record, separator + CRLF
            pieces[0::3] = [b"%x\r\n" % (len(r) + n) for r in records]
            pieces[1::3] = records
            data = b"".join(pieces)
        else:
            self.partial, data = data, b""
        if len(self.partial) > MAX_LINE:  # send an over-long record on, so memory stays bounded
            data, self.partial, self.broken = data + chunk(self.partial), b"", True
        return data

    def finish(self):
        return chunk(self.partial) + b"0\r\n\r\n" if self.chunked else b""

    def fail(self, message):
        if not self.error_template:
            return None
        record = self.error_template % json.dumps(message).encode()
        return chunk((self.sep if self.broken else b"") + record) + b"0\r\n\r\n"

FRAMERS = {"application/x-ndjson": (b"\n", b'{"error": %s}\n'),
           "text/event-stream": (b"\n\n", b'data: {"error": {"message": %s, "type": "api_error"}}\n\n')}

def plan_response(resp, req):
    """The client's head and framing for an upstream response: (head, framer, keep_alive)."""
    headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP
               and k.lower() != "content-length"]
    keep_alive, framer = req.keep_alive, Framer(chunked=False)
    if resp.length is not None:  # a known length, or no body at all (HEAD, 204, 304)
        if resp.length or "content-length" in resp.headers:
            headers.append(("Content-Length", resp.headers.get("content-length", resp.length)))
    else:
        headers.append(("X-Accel-Buffering", "no"))  # so an nginx in front does not buffer
        if req.version == "HTTP/1.0":
            keep_alive = False  # close-delimited: an HTTP/1.0 client cannot read chunks
        else:
            headers.append(("Transfer-Encoding", "chunked"))
            kind = resp.getheader("content-type", "").split(";")[0].strip().lower()
            framer = Framer(True, *FRAMERS.get(kind, ()))
    if not keep_alive:
        headers.append(("Connection", "close"))
    return response_head(resp.status, resp.reason, headers), framer, keep_alive

class RequestWriter(http.client.HTTPConnection):
    """http.client writes the upstream request; we keep the bytes instead of sending them."""
    def send(self, data):
        self.wire.append(bytes(data))

def upstream_request(req, body, host, strip_authorization):
    """The request for the upstream: end-to-end headers only, its own Host, a Content-Length."""
    writer = RequestWriter(host)
    writer.wire = []
    writer.putrequest(req.method, req.target, skip_host=True, skip_accept_encoding=True)
    writer.putheader("Host", host)
    for name, value in req.headers:
        lower = name.lower()
        if not (lower in NOT_FORWARDED or lower in req.connection or lower.startswith("proxy-")
                or (strip_authorization and lower == "authorization")):
            writer.putheader(name, value)
    if req.has_body:
        writer.putheader("Content-Length", str(len(body)))
    writer.endheaders(body if req.has_body else None)
    return b"".join(writer.wire)

def parse_response_head(head, method):
    """Parse an upstream response head with http.client, from memory."""
    resp = http.client.HTTPResponse(types.SimpleNamespace(makefile=lambda mode: io.BytesIO(head)),
                                    method=method)
    try:
        resp.begin()
    except (http.client.HTTPException, ValueError) as e:
        raise ProtocolError(502, "upstream sent a malformed response head (%s)" % type(e).__name__)
    return resp

class Metrics:
    """Exact counters for /qlite/metrics."""
    def __init__(self):
        self.codes, self.rejected, self.upstream_errors, self.response_bytes = {}, 0, 0, 0
        self.ttfb_counts, self.ttfb_sum = [0] * (len(TTFB_BUCKETS) + 1), 0.0
        self.tokens, self.eval_seconds = 0, 0.0

    def observe_ttfb(self, seconds):
        self.ttfb_sum += seconds
        self.ttfb_counts[sum(1 for b in TTFB_BUCKETS if seconds > b)] += 1

    def observe_done_line(self, line):
        """Count generated tokens from the final `done` line of an NDJSON stream."""
        try:
            final = json.loads(line)
            if final.get("done") is True:
                self.tokens += int(final.get("eval_count", 0))
                self.eval_seconds += int(final.get("eval_duration", 0)) / 1e9
        except (ValueError, TypeError, AttributeError):
            pass

    def render(self, active, max_active):
        lines = []
        def metric(name, kind, samples):
            lines.append("# TYPE qlite_%s %s" % (name, kind))
            lines.extend("qlite_%s%s %s" % (name, labels, value) for labels, value in samples)
        metric("active_requests", "gauge", [("", active)])
        metric("max_active_requests", "gauge", [("", max_active)])
        metric("requests_total", "counter", [('{code="%d"}' % c, n) for c, n in sorted(self.codes.items())])
        metric("rejected_total", "counter", [("", self.rejected)])
        metric("upstream_errors_total", "counter", [("", self.upstream_errors)])
        metric("response_bytes_total", "counter", [("", self.response_bytes)])
        cumulative = [sum(self.ttfb_counts[:i + 1]) for i in range(len(self.ttfb_counts))]
        metric("time_to_first_byte_seconds", "histogram",
               [('_bucket{le="%s"}' % b, n) for b, n in zip(TTFB_BUCKETS + ("+Inf",), cumulative)]
               + [("_sum", repr(self.ttfb_sum)), ("_count", cumulative[-1])])
        metric("generated_tokens_total", "counter", [("", self.tokens)])
        metric("generation_seconds_total", "counter", [("", repr(self.eval_seconds))])
        return ("\n".join(lines) + "\n").encode()


# ================================================================================ The client connection

class Client:
    """One client connection: reads requests in order, answers or forwards each, writes back."""

    def __init__(self, gw, sock, addr):
        self.gw, self.sock, self.addr = gw, sock, "%s:%s" % addr[:2]
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.request = self.upstream = self.body_parts = None  # the request being read or
        # served, its Upstream once forwarded, and the pieces of its body as they arrive
        self.status = self.first_byte = None  # of the response under way, once its head is out
        self.sent = self.events = 0
        self.closing = self.lingering = self.closed = False  # closing: hang up once flushed
        self.deadline = time.monotonic() + gw.args.client_timeout  # to receive a whole request
        self.stall_deadline = float("inf")  # for the client to take pending output
        gw.clients.add(self)
        self.set_interest()

    def on_event(self, mask):
        if mask & READ:
            try:
                data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                return self.close()  # client gone: close() also cancels its upstream
            if data and not self.lingering:
                self.inbuf += data
                self.advance()
        if mask & WRITE:
            self.flush()

    def on_timeout(self, now):
        if self.lingering or now > self.stall_deadline or (self.request is None and not self.inbuf):
            self.close()  # done lingering, not reading its output, or idle between requests
        else:
            self.fail(ProtocolError(408, "request not received in %gs" % self.gw.args.client_timeout))
            self.set_interest()

    def advance(self):
        """Start the requests waiting in inbuf, in order, until one is in flight or bytes run out."""
        try:
            while not self.closing and self.upstream is None:
                if self.request is None:
                    end = self.inbuf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
                    if end < 0:
                        if len(self.inbuf) > MAX_HEAD:
                            raise ProtocolError(431, "request head over %d bytes" % MAX_HEAD)
                        break
                    self.start_request(bytes(self.inbuf[:end]), len(self.inbuf) > end + 4)
                    del self.inbuf[:end + 4]
                body = self.request.body
                if not body.done and self.inbuf:
                    data, self.inbuf = bytes(self.inbuf), bytearray()
                    self.body_parts.append(body.feed(data))
                    self.inbuf += body.rest  # the start of a pipelined request, if any
                if not body.done:
                    break
                self.dispatch()
        except ProtocolError as e:
            self.fail(e)
        self.set_interest()

    def start_request(self, head, body_started):
        self.request = req = parse_request(head, self.gw.args.max_body)
        self.body_parts = []
        self.gw.check_access(req)
        if req.header("expect").lower() == "100-continue" and not req.body.done and not body_started:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second otherwise

    def dispatch(self):
        """The whole request is here: answer it ourselves or send it upstream."""
        gw, req = self.gw, self.request
        self.deadline = float("inf")
        if req.path.startswith("/qlite/"):  # our own endpoints are never forwarded
            return self.respond(*gw.own_endpoint(req))
        if gw.active >= gw.args.max_active:
            gw.metrics.rejected += 1
            return self.respond(503, "all %d slots are busy, retry shortly" % gw.args.max_active,
                                extra=[("Retry-After", "1")])
        body, self.body_parts = b"".join(self.body_parts), None
        wire = upstream_request(req, body, gw.upstream_host, gw.args.api_key is not None)
        self.upstream = Upstream(gw, self, wire)

    def respond(self, status, body, content_type="application/json", extra=(), close=False):
        """Answer the current request ourselves; body is bytes, or an error message."""
        req = self.request
        if isinstance(body, str):
            body = error_body(req.path if req else "", status, body)
        close = close or req is None or not req.keep_alive
        headers = [("Content-Type", content_type), ("Content-Length", len(body)),
                   ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()))]
        headers += list(extra) + ([("Connection", "close")] if close else [])
        head = response_head(status, http.client.responses.get(status, ""), headers)
        self.start_response(status, head + (b"" if req and req.method == "HEAD" else body))
        self.end_response(close)

    def fail(self, error):
        """Answer bad input and hang up: where the next request would start is unknowable."""
        self.respond(error.status, str(error), extra=error.headers, close=True)

    def start_response(self, status, data, flush=True):
        self.status, self.first_byte, self.sent = status, time.monotonic(), 0
        self.write(data, flush)

    def end_response(self, close):
        """The response is queued whole: log it, then hang up or wait for the next request."""
        self.gw.log_request(self, self.status)
        self.request = self.status = self.first_byte = None
        self.closing = self.closing or close or self.gw.draining
        self.deadline = time.monotonic() + self.gw.args.client_timeout

    def upstream_done(self, tail, keep_alive):
        """The upstream has ended: tail ends the body, or None cuts it short."""
        self.upstream = None
        self.write(tail or b"")
        self.end_response(tail is None or not keep_alive)
        if not self.closed:
            self.advance()

    def write(self, data, flush=True):
        """Queue bytes for the client and send what the socket takes now."""
        self.sent += len(data)
        self.gw.metrics.response_bytes += len(data)
        if flush and not self.outbuf and data and not self.closed:
            try:  # the common case: nothing queued, so send straight from data without a copy
                data = data[self.sock.send(data):]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return self.close()
        self.outbuf += data
        if flush:
            self.flush()
        if len(self.outbuf) > HIGH_WATER and self.upstream:
            self.upstream.pause(True)

    def flush(self):
        if self.outbuf and not self.closed:
            try:
                del self.outbuf[:self.sock.send(self.outbuf)]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return self.close()
            self.stall_deadline = time.monotonic() + self.gw.args.client_timeout
            if not self.outbuf:
                self.stall_deadline = float("inf")
                if self.upstream:
                    self.upstream.pause(False)
        self.set_interest()

    def set_interest(self):
        """Read unless pipelined input piles up; write while output waits; linger when done."""
        if self.closed:
            return
        if self.closing and not self.outbuf and not self.lingering:
            try:  # shut our side, read until the client hangs up: a reset cannot eat our answer
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                return self.close()
            self.lingering, self.deadline, self.inbuf = True, time.monotonic() + LINGER, bytearray()
        busy = self.upstream is not None or self.closing
        want = (0 if busy and len(self.inbuf) > MAX_HEAD else READ) | (WRITE if self.outbuf else 0)
        if want != self.events:
            if not want:
                self.gw.sel.unregister(self.sock)
            elif self.events:
                self.gw.sel.modify(self.sock, want, self)
            else:
                self.gw.sel.register(self.sock, want, self)
            self.events = want

    def close(self):
        if self.closed:
            return
        self.closed = self.closing = True
        if self.upstream or (self.request and self.status is None):
            self.gw.log_request(self, 499)  # the client left before its answer was complete
        if self.upstream:
            self.upstream.close()  # Ollama cancels the generation when we hang up
        if self.events:
            self.gw.sel.unregister(self.sock)
        self.sock.close()
        self.gw.clients.discard(self)

# ================================================================================ The upstream connection

class Upstream:
    """One request forwarded to Ollama: connect, send, read the head, stream the body back."""

    def __init__(self, gw, client, wire):
        self.gw, self.client, self.wire = gw, client, wire
        self.response = self.reader = self.framer = None
        self.paused = self.closed = False
        gw.active += 1
        gw.upstreams.add(self)
        self.connect(gw.idle.pop() if gw.idle else None)

    def connect(self, sock):
        """Send on an idle kept-alive connection, or open a new one without blocking."""
        self.reused, self.out, self.head = sock is not None, memoryview(self.wire), bytearray()
        if sock is None:
            sock = socket.socket(self.gw.upstream_family, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(self.gw.upstream_addr)  # in progress; a refusal shows when we send
        self.sock = sock
        self.deadline = time.monotonic() + min(CONNECT_TIMEOUT, self.gw.args.upstream_timeout)
        if self.reused:
            self.on_event(WRITE)  # a kept-alive connection is writable now: no need to wait a turn
        else:
            self.gw.sel.register(sock, WRITE, self)

    def on_event(self, mask):
        try:
            if self.out:
                self.send()
            else:
                self.receive()
        except ProtocolError as e:
            if getattr(e, "decoded", b"") and not self.closed:
                self.client.write(self.framer.frame(e.decoded))
            self.fail(e.status, str(e))
        except OSError as e:
            self.fail(502, "upstream connection failed: %s" % (e.strerror or e))

    def send(self):
        try:
            self.out = self.out[self.sock.send(self.out):]
        except (BlockingIOError, InterruptedError):
            pass
        if not self.out:
            self.deadline = time.monotonic() + self.gw.args.upstream_timeout
        self.gw.sel.modify(self.sock, WRITE if self.out else READ, self)

    def receive(self):
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            if self.reader and self.reader.left is None:  # the body ends with the connection
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
        self.client.write(self.framer.frame(self.reader.feed(data)))
        if self.reader.done and not self.closed:
            self.finish()

    def start(self, head):
        """The response head is here: choose how to read the body and how to frame it."""
        resp = self.response = parse_response_head(head, self.client.request.method)
        self.reader = ChunkedReader() if resp.chunked else LengthReader(resp.length)
        head, self.framer, self.keep_client = plan_response(resp, self.client.request)
        self.gw.metrics.observe_ttfb(time.monotonic() - self.client.request.started)
        self.client.start_response(resp.status, head, flush=False)  # leaves with the body's start

    def finish(self):
        """A clean end: keep the connection for the next request if its framing allows."""
        reusable = not (self.response.will_close or self.reader.rest)
        if self.framer.sep == b"\n":
            self.gw.metrics.observe_done_line(self.framer.last)
        self.close(reusable)
        self.client.upstream_done(self.framer.finish(), self.keep_client)

    def fail(self, status, message):
        """Tell the client: an error response before the head, a last record or a cut after it."""
        if self.closed:
            return
        if self.reused and status == 502 and not self.head:
            self.gw.sel.unregister(self.sock)  # the idle connection had gone stale: once more anew
            self.sock.close()
            return self.connect(None)
        self.gw.metrics.upstream_errors += 1
        self.close()
        if self.response is not None:
            return self.client.upstream_done(self.framer.fail(message), self.keep_client)
        self.client.upstream = None
        self.client.respond(status, message)
        self.client.advance()

    def on_timeout(self, now):
        self.fail(504, "could not connect to the upstream in time" if self.out else
                  "upstream silent for %gs" % self.gw.args.upstream_timeout)

    def pause(self, paused):
        """Stop reading while the client has too much unsent output; go on once it drained."""
        if paused != self.paused and not self.closed and not self.out:
            self.paused, self.deadline = paused, time.monotonic() + self.gw.args.upstream_timeout
            if paused:
                self.gw.sel.unregister(self.sock)
            else:
                self.gw.sel.register(self.sock, READ, self)

    def close(self, reusable=False):
        """Free the slot exactly once, whatever ended the request; hang up or keep the socket."""
        if self.closed:
            return
        self.closed = True
        self.gw.active -= 1
        self.gw.upstreams.discard(self)
        if reusable and len(self.gw.idle) < self.gw.args.max_active:  # idle, but registered:
            keep = self.gw.sel.register if self.paused else self.gw.sel.modify  # see Gateway.run
            keep(self.sock, READ, None)
            self.gw.idle.append(self.sock)
        else:
            if not self.paused:  # (a paused socket is unregistered while its client drains)
                self.gw.sel.unregister(self.sock)
            self.sock.close()

# ================================================================================ The loop

class Gateway:
    """The listener, the selector, the slots, the counters and the loop that drives them all."""

    def __init__(self, args):
        self.args, self.metrics, self.sel = args, Metrics(), selectors.DefaultSelector()
        self.clients, self.upstreams, self.idle = set(), set(), []  # idle: kept-alive upstreams
        self.active, self.stop_requested, self.draining, self.accept_paused_until = 0, 0, 0, None
        host, port = args.upstream_host, args.upstream_port
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]  # once, at start-up
        self.upstream_family, self.upstream_addr = info[0], info[4]
        self.upstream_host = "%s:%d" % ("[%s]" % host if ":" in host else host, port)
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        self.listener = socket.create_server((args.host, args.port), family=family, backlog=1024)
        self.listener.setblocking(False)
        self.sel.register(self.listener, READ, self)

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

    def own_endpoint(self, req):
        """Q-Lite's own endpoints: (status, body[, content type, headers]) for respond()."""
        if req.path not in ("/qlite/health", "/qlite/metrics"):
            return 404, "no such Q-Lite endpoint"
        if req.method not in ("GET", "HEAD"):
            return 405, "use GET", "application/json", [("Allow", "GET")]
        if req.path == "/qlite/metrics":
            page = self.metrics.render(self.active, self.args.max_active)
            return 200, page, "text/plain; version=0.0.4; charset=utf-8"
        return 200, json.dumps({"status": "draining" if self.draining else "ok",
                                "active": self.active, "max_active": self.args.max_active,
                                "upstream": "http://" + self.upstream_host}).encode()

    def log_request(self, client, status):
        """Count a finished request and write its access-log line."""
        self.metrics.codes[status] = self.metrics.codes.get(status, 0) + 1
        if not self.args.quiet:
            req, now = client.request, time.monotonic()
            started = req.started if req else now
            ttfb = "%.3fs" % (client.first_byte - started) if client.first_byte and req else "-"
            sys.stderr.write('%s "%s %s" %d %dB ttfb=%s %.3fs\n' % (
                client.addr, req.method if req else "-", req.target if req else "-", status,
                client.sent, ttfb, now - started))

    def run(self):
        """The loop: dispatch events, sweep deadlines, drain on the first signal."""
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        next_sweep = drain_deadline = 0.0
        while not self.draining or (self.clients and time.monotonic() < drain_deadline):
            for key, mask in self.sel.select(TICK):
                if key.data is None:  # an idle upstream connection: any event means it is gone
                    if key.fileobj in self.idle:  # (unless taken for a request earlier in this batch)
                        self.idle.remove(key.fileobj)
                        self.sel.unregister(key.fileobj)
                        key.fileobj.close()
                    continue
                try:
                    key.data.on_event(mask)
                except Exception:  # a bug hurts one connection, never the loop
                    traceback.print_exc()
                    victim = getattr(key.data, "client", key.data)
                    if victim is not self:
                        victim.close()
            now = time.monotonic()
            if self.stop_requested and not self.draining:
                self.drain()
                drain_deadline = now + DRAIN
            if now >= next_sweep:
                self.sweep(now)
                next_sweep = now + TICK
        return 0

    def sweep(self, now):
        """Time out whatever has waited too long; accept again after a pause."""
        if self.accept_paused_until and now >= self.accept_paused_until and not self.draining:
            self.accept_paused_until = None
            self.sel.register(self.listener, READ, self)
        for conn in [c for c in self.clients if now > min(c.deadline, c.stall_deadline)] + \
                [u for u in self.upstreams if now > u.deadline and not u.paused]:
            if not conn.closed:
                conn.on_timeout(now)

    def on_signal(self, signum, frame):
        if self.stop_requested:
            raise SystemExit(1)  # a second signal: stop now
        self.stop_requested = True

    def drain(self):
        """Stop listening and close idle connections; requests in flight may finish."""
        self.draining = True
        if not self.accept_paused_until:
            self.sel.unregister(self.listener)
        self.listener.close()
        for client in list(self.clients):
            if client.request is None and not client.outbuf:
                client.close()

def main(argv=None):
    args = parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:  # a thousand idle connections need descriptors
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    try:
        gw = Gateway(args)
    except socket.gaierror as e:
        sys.stderr.write("qlite: cannot resolve upstream %r: %s\n" % (args.upstream_host, e))
        return 1
    except OSError as e:
        sys.stderr.write("qlite: cannot listen on %s:%d: %s\n" % (args.host, args.port, e.strerror or e))
        return 1
    host, port = gw.listener.getsockname()[:2]
    note = "" if args.api_key or host in ("127.0.0.1", "::1") else \
        " (no --api-key: anyone who can reach this port can use the model)"
    sys.stderr.write("qlite: listening on http://%s:%d, upstream http://%s, max %d active%s\n"
                     % ("[%s]" % host if ":" in host else host, port, gw.upstream_host,
                        args.max_active, note))
    sys.stderr.flush()
    return gw.run()

if __name__ == "__main__":
    sys.exit(main())

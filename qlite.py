"""Q-Lite: a tiny gateway that lets many people share one Ollama server safely.

One thread runs one `selectors` loop over non-blocking sockets, each a Connection: the listener
(the Gateway), each client (`Client`), each request forwarded to Ollama (`Upstream`) and the
reachability probe (`Probe`). A Connection derives the events it wants from its state, queues
what its socket cannot take yet and has one deadline; an error ends the exchange that raised it,
never the loop. Bytes stay in their connection's buffer until a pure reader takes them, so no
result depends on how TCP split them. `Access` knows whose each key is, its share and its use;
`http.client` writes each request to Ollama and parses the response head, and a Framer
re-chunks the body, one chunk per NDJSON line or SSE event.
"""

import argparse, bisect, hashlib, http.client, io, json, os, posixpath, re, resource
import itertools, pathlib, selectors, signal, socket, sys, time, traceback, types
from collections import Counter, defaultdict
from contextlib import suppress
from urllib.parse import unquote, urlsplit

# ================================================================================ Configuration

MAX_HEAD = 64 * 1024        # request head (431 beyond) or response head (502 beyond)
MAX_HEADERS = 100           # 431 beyond
MAX_TARGET = 8 * 1024       # 414 beyond
MAX_CHUNK_LINE = 1024       # a chunk-size or trailer line, every byte counted; 400 beyond
MAX_RECORD = 1024 * 1024    # a longer NDJSON line or SSE event is forwarded in pieces
HIGH_WATER = 256 * 1024     # unsent output above which nothing more is read for that client
READ_SIZE = 64 * 1024
TAIL = 1024                 # the end of a response, where Ollama reports the tokens it counted
CONNECT_TIMEOUT = 10.0      # a dead upstream host must not hold a slot for the whole timeout
PROBE_EVERY = 1.0           # how often a bare connect tells whether Ollama can be reached
LINGER = 2.0                # after our last byte, how long a client may go on sending
DRAIN = 30.0                # how long requests in flight may run after SIGTERM
TICK = 0.25                 # deadline sweep period
HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect"}
ADMIN = re.compile(r"/+api/(?:(?:pull|push|create|copy|delete)\Z|blobs)")  # normpath keeps a //
# requests that only ask what Ollama has: they cost it nothing and take no generation slot
LIGHT = re.compile(r"(GET|HEAD) /(api/(tags|version))?|GET /api/ps|POST /api/show"  # as routed
                   r"|GET /v1/models(/.+)?|OPTIONS .*")  # a CORS preflight too: answered at once
TTFB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
NDJSON = "application/x-ndjson"
RECORDS = {  # media type: what ends a record cut short, and the error record that ends a stream
    NDJSON: (b"\n", b'{"error": %s}\n'),
    "text/event-stream": (b"\n\n", b'data: {"error": {"message": %s, "type": "api_error"}}\n\n')}
READ, WRITE, NEVER = selectors.EVENT_READ, selectors.EVENT_WRITE, float("inf")
RETRY_SOON = [("Retry-After", "1")]  # with a 503 or 429 that nothing reached Ollama
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               429: "rate_limit_error"}  # the OpenAI error type, on /v1/
USE = ("requests", "active", "rejected", "prompt_tokens", "completion_tokens")  # per key, in order
KEY_LINE = re.compile(r"([A-Za-z0-9_.-]+)\s+([!-~]+)")  # NAME KEY: a key is printable ASCII

def parse_upstream(value):
    """Read an upstream the way Ollama reads OLLAMA_HOST: host, host:port or http://host:port."""
    url = urlsplit(value if "://" in value else "http://" + value)
    with suppress(ValueError):  # (a port that is not a number)
        if url.scheme == "http" and url.hostname and url.path in ("", "/") and not (
                url.query or url.fragment or url.username):
            return url.hostname, 11434 if url.port is None else url.port
    raise argparse.ArgumentTypeError("upstream must look like http://host[:port], got %r" % value)

def parse_args(argv=None):
    """The command line; a mistake is one clear line and exit status 2."""
    p = argparse.ArgumentParser(prog="qlite.py", description="Share one Ollama server safely.")
    add = p.add_argument
    add("--host", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    add("--port", type=int, default=8080, help="port to listen on (8080)")
    add("--upstream", default=os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434",
        type=parse_upstream, help="Ollama's address ($OLLAMA_HOST, else http://127.0.0.1:11434)")
    add("--max-active", type=int, default=10, help="generations at once; more get 503 (10)")
    add("--client-timeout", type=float, default=30.0, help="seconds to send, idle, stall (30)")
    add("--upstream-timeout", type=float, default=600.0, help="seconds Ollama may be silent")
    add("--max-body", type=int, default=64 << 20, help="largest request body (64 MiB)")
    add("--api-key", default=os.environ.get("QLITE_API_KEY"), help="require Bearer KEY")
    add("--keys", metavar="FILE", help="a key for each person, 'NAME KEY' a line; SIGHUP re-reads")
    add("--max-per-key", type=int, default=0, metavar="N", help="generations per key; more: 429")
    add("--allow-admin", action="store_true", help="let clients pull, push, create, copy, delete")
    add("--quiet", action="store_true", help="no access log")
    args = p.parse_args(argv)
    for flag, ok in (("port", 0 <= args.port <= 65535), ("max-active", args.max_active > 0),
                     ("client-timeout", args.client_timeout > 0), ("max-body", args.max_body >= 0),
                     ("upstream-timeout", args.upstream_timeout > 0),
                     ("max-per-key", args.max_per_key >= 0)):
        if not ok:
            p.error("argument --%s: out of range" % flag)
    return args

def sha256(key):
    """A key as it is held and looked up: by its SHA-256, so a lookup tells nothing of others."""
    return hashlib.sha256(key.encode("latin-1")).digest()

def read_keys(args):
    """The keys in force, {SHA-256: name}: --api-key's, then the file's; ValueError: FILE:LINE."""
    keys = {sha256(args.api_key): "api-key"} if args.api_key else {}
    try:  # (latin-1: any byte reads)
        lines = pathlib.Path(args.keys or os.devnull).read_text("latin-1").splitlines()
    except OSError as e:
        raise ValueError("cannot read %s: %s" % (args.keys, e.strerror or e))
    for number, line in enumerate(lines, 1):
        entry = KEY_LINE.fullmatch(line.strip())
        if not entry and line.strip()[:1] in ("", "#"):
            continue  # a blank line or a comment
        problem = ("expected NAME KEY: a name of letters, digits, _ . - and a printable ASCII key"
                   if not entry else "duplicate name %r" % entry[1] if entry[1] in keys.values()
                   else "duplicate key" if sha256(entry[2]) in keys else None)
        if problem:
            raise ValueError("%s:%d: %s" % (args.keys, number, problem))
        keys[sha256(entry[2])] = entry[1]
    return keys

# ================================================================================ Wire helpers

TOKEN = r"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
REQUEST_LINE = re.compile(r"(%s) ([!-~]+) (HTTP/\d\.\d)\Z" % TOKEN)  # a visible ASCII target
FIELD = r"(%s):([^\x00-\x08\x0a-\x1f\x7f]*)" % TOKEN  # a header or trailer field; greedy, and
# its spaces stripped in code: a lazy value before [ \t]* takes quadratic time on a run of spaces
HEADER_LINE = re.compile(FIELD + r"\Z")
EMPTY_LINES = re.compile(rb"(?:\r?\n)*")  # a lone CR is no empty line
HEAD_END = re.compile(rb"\n\r?\n")  # a literal first byte: 35 times faster to search for
INTERIM = re.compile(rb"HTTP/1\.\d 1\d\d\b")  # 1xx: 103 Early Hints, 102 Processing
ABSOLUTE_FORM = re.compile(r"(?:http://(\[[0-9A-Fa-f:.]+\]|[^/?#\[\]@]*))?", re.IGNORECASE)
EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")  # a line end, then an empty line
QUOTED = r'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
EXTENSION = r"[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?" % (TOKEN, TOKEN, QUOTED)
CHUNK_LINES = {due: (re.compile(rule.encode()), problem) for due, rule, problem in (  # RFC 9112
    ("size", r"0*([0-9A-Fa-f]{1,15})(?:%s)*[ \t]*\r\n" % EXTENSION, "bad chunk size or extension"),
    ("end", r"\r\n", "chunk longer than its size"),  # the CRLF after a chunk's data
    ("trailer", r"(?:%s)?\r\n" % FIELD, "malformed trailer line"))}
USAGE = re.compile(rb'"(prompt_eval_count|eval_count|eval_duration|prompt_tokens|'
                   rb'completion_tokens)": ?(\d+)[,}\s]')  # Ollama's counts, and OpenAI's usage

class ProtocolError(Exception):
    """Input we will not pass on, with the HTTP status (and headers) to answer it with."""
    def __init__(self, status, message, headers=()):
        super().__init__(message)  # decoded: body bytes before bad framing still go out
        self.status, self.headers, self.decoded = status, headers, b""

def require(condition, status, message, headers=()):
    """A rule of the protocol: where input breaks it, ProtocolError with the status to answer."""
    if not condition:
        raise ProtocolError(status, message, headers)

def response_head(status, headers, close=False):
    """A response head with our own reason phrase; close: the connection closes after it."""
    lines = ["HTTP/1.1 %d %s" % (status, http.client.responses.get(status, ""))]
    lines += ["%s: %s" % h for h in headers] + ["Connection: close"] * close
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

def read_head(buf, start=0, too_large=431):
    """Take a message head from the front of buf, or None; search from near start (no rescan)."""
    del buf[:EMPTY_LINES.match(buf).end()]  # RFC 9112, 2.2; lines may end in a bare LF (nc)
    end = HEAD_END.search(buf, max(0, start - 2), MAX_HEAD)
    if end is None:
        require(len(buf) < MAX_HEAD, too_large, "message head over %d bytes" % MAX_HEAD)
        return None
    head = bytes(buf[:end.start()]).removesuffix(b"\r")
    del buf[:end.end()]
    return head

class Request:
    """A request head, parsed strictly (or ProtocolError), and its body as it arrives."""
    def __init__(self, head, max_body):
        lines = re.split(r"\r?\n", head.decode("latin-1"))
        line = REQUEST_LINE.match(lines[0])
        require(line, 400, "malformed request line")
        self.method, target, self.version = line.groups()
        require(self.version in ("HTTP/1.1", "HTTP/1.0"), 505, "unsupported HTTP version")
        require(self.method != "CONNECT", 405, "CONNECT is not supported: not a forward proxy")
        require(len(target) <= MAX_TARGET, 414, "request target over %d bytes" % MAX_TARGET)
        require(len(lines) <= MAX_HEADERS + 1, 431, "more than %d request headers" % MAX_HEADERS)
        target = target[ABSOLUTE_FORM.match(target).end():] or "/"  # http://any-host/x means our /x
        require(target.startswith("/"), 400, "malformed request target")
        self.target, self.path, self.fields = target, target.split("?", 1)[0], {}
        for line in lines[1:]:
            field = HEADER_LINE.match(line)
            require(field, 400, "malformed header line")  # obs-fold, space before the colon
            self.fields.setdefault(field.group(1).lower(), []).append(field.group(2).strip(" \t"))
        require(self.version == "HTTP/1.0" or len(self.fields.get("host", ())) == 1, 400,
                "an HTTP/1.1 request needs exactly one Host header")
        self.connection = {t.strip().lower() for t in ",".join(self.fields.get("connection", ()))
                           .split(",")}
        self.keep_alive = self.version == "HTTP/1.1" and "close" not in self.connection  # 1.0: no
        self.parts, self.started, self.user = [], time.monotonic(), ""  # user: the key's name
        codings, lengths = self.fields.get("transfer-encoding"), self.fields.get("content-length")
        require(not codings or not lengths and self.version == "HTTP/1.1", 400,  # RFC 9112, 6.1
                "Transfer-Encoding with Content-Length or in HTTP/1.0")
        require(not codings or ",".join(codings).lower() == "chunked", 501,
                "only the chunked transfer-encoding is supported")
        lengths = lengths or ["0"]
        require(len(set(lengths)) == 1 and re.match(r"[0-9]{1,18}\Z", lengths[0]), 400,
                "bad Content-Length")
        require(int(lengths[0]) <= max_body, 413, "request body larger than %d bytes" % max_body)
        self.body = BodyReader(int(lengths[0]), bool(codings), max_body)

class BodyReader:
    """Takes a body from a buffer, by length, chunked (as strictly as h11) or till the close."""
    def __init__(self, length=None, chunked=False, limit=None):
        self.chunked, self.limit, self.size, self.trailers = chunked, limit, 0, 0  # read so far
        self.left = 0 if chunked else NEVER if length is None else length  # due in this chunk
        self.due, self.done = "size", not (chunked or self.left)  # due: a key of CHUNK_LINES

    def read(self, buf):
        """Decode what buf holds: the body bytes it took."""
        out = []
        try:
            while buf and not self.done:
                if self.left:  # (a slice of a bytearray is a copy: only as long as it must be)
                    out.append(buf[:self.left] if self.left < len(buf) else buf[:])
                    del buf[:len(out[-1])]  # (from the front of a bytearray: no copy)
                    self.left -= len(out[-1])
                    self.done = not (self.left or self.chunked)
                    continue
                eol = buf.find(b"\n", 0, MAX_CHUNK_LINE + 2)  # a line and its CRLF
                if eol < 0:  # matched only once whole: a regex run per byte that came would cost
                    require(len(buf) < MAX_CHUNK_LINE + 2, 400,  # quadratic time
                            "chunk line over %d bytes" % MAX_CHUNK_LINE)
                    break
                rule, problem = CHUNK_LINES[self.due]
                line = rule.match(buf, 0, eol + 1)  # (a bare LF never matches)
                require(line, 400, problem)
                if self.due == "size":
                    self.left = int(line.group(1), 16)
                    self.size += self.left
                    if self.limit is not None and self.size > self.limit:
                        raise ProtocolError(413, "request body larger than %d bytes" % self.limit)
                    self.due = "end" if self.left else "trailer"
                elif self.due == "end":
                    self.due = "size"
                else:  # trailer fields are read, then dropped; an empty line ends the body
                    self.done, self.trailers = line.group(1) is None, self.trailers + 1
                    require(self.done or self.trailers <= MAX_HEADERS, 431,
                            "more than %d trailer fields" % MAX_HEADERS)
                del buf[:eol + 1]  # only now: the match reads the line from buf
        except ProtocolError as e:
            e.decoded = b"".join(out)
            raise
        return b"".join(out)

def chunks(records):
    """Each record as one chunk of a chunked body (records must not be empty)."""
    if len(records) == 1:  # one token: the most frequent case, and the cheapest
        return b"%x\r\n%s\r\n" % (len(records[0]), records[0])
    return b"".join([b"%x\r\n%s\r\n" % (len(r), r) for r in records])

class Framer:
    """Frames a body for the client: as it is, chunked, or a chunk per NDJSON line or SSE event."""
    def __init__(self, chunked, media_type=None):  # (in any case, with any parameters)
        kind = (media_type or "").split(";")[0].strip().lower()
        self.chunked, self.kind = chunked, kind if chunked and kind in RECORDS else None
        self.partial, self.broken, self.tail = b"", False, bytearray()  # see frame()

    def frame(self, data, final=False):
        """What the client gets for body bytes that arrived; final: the body has ended."""
        self.tail += data  # its last TAIL bytes: where Ollama reports the tokens it counted
        del self.tail[:-TAIL]  # (from the front of a bytearray: no copy)
        if self.kind is None:
            return chunks([data]) if data and self.chunked else data
        data = self.partial + data
        if self.kind == NDJSON:  # lines end as httpx's iter_lines sees them: LF, CRLF, lone CR
            cut = len(data) if data.endswith(b"\n") else 1 + max(  # (the common case: whole)
                data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - (not final)))
            records = data[:cut].splitlines(True)
        else:  # a CR that ends a read may be half of a CRLF: it counts once the next byte is in
            ends = [m.end() for m in EVENT_END.finditer(data, 0, len(data) - (
                not final and data.endswith(b"\r")))]
            cut = ends[-1] if ends else 0
            records = [data[a:b] for a, b in zip([0] + ends, ends)]
        self.partial = data[cut:]  # a record still missing its end
        self.broken = self.broken and not records  # part of a record went out without its end
        if len(self.partial) > MAX_RECORD:  # send an over-long record on: memory stays bounded
            records.append(self.partial)
            self.partial, self.broken = b"", True
        return chunks(records)

    def end(self, error=None):
        """The last bytes; after a failure an error record, or None to cut the body short."""
        if error and not self.kind:
            return None
        tail = self.frame(b"", final=True)  # (b"" for a body sent as it is)
        if error:  # what is left of an unfinished record is dropped
            sep, template = RECORDS[self.kind]
            self.partial = (sep if self.broken else b"") + template % json.dumps(error).encode()
        return tail + chunks([self.partial] if self.partial else []) + b"0\r\n\r\n" * self.chunked

def upstream_request(req, host, strip_authorization):
    """The request for the upstream: end-to-end headers only, its own Host, a Content-Length."""
    body, req.parts = req.parts, []  # the body moves on as it came: not joined, not kept
    writer, wire = http.client.HTTPConnection(host), []
    writer.send = wire.append  # http.client writes the request; we keep the bytes
    writer.putrequest(req.method, req.target, skip_accept_encoding=True)  # Host: its own
    for name, values in req.fields.items():
        if not (name in NOT_FORWARDED or name in req.connection or name.startswith("proxy-")
                or "_" in name  # as nginx does: a CGI-style upstream would read _ as -
                or (strip_authorization and name == "authorization")):
            for value in values:
                writer.putheader(name, value)
    if "content-length" in req.fields or "transfer-encoding" in req.fields:
        writer.putheader("Content-Length", str(sum(map(len, body))))
    writer.endheaders()
    return wire + body

def plan_response(head, req):
    """Parse an upstream response head with http.client: (status, client's head, reader, framer)."""
    resp = http.client.HTTPResponse(types.SimpleNamespace(makefile=lambda mode: io.BytesIO(head)),
                                    method=req.method)
    try:
        resp.begin()
    except (http.client.HTTPException, ValueError) as e:
        raise ProtocolError(502, "upstream sent a malformed response head (%s)" % type(e).__name__)
    lengths = set(resp.headers.get_all("content-length", []))  # one, or chunked, as nginx wants
    require(len(lengths) + resp.chunked <= 1 and all(n.isdecimal() for n in lengths) and all(
        HEADER_LINE.match(line) for line in re.split(r"\r?\n", head.decode("latin-1"))[1:]),
        502, "upstream sent an invalid response head")  # (latin-1: decimal is only 0-9)
    headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
    reader = BodyReader(resp.length, resp.length is None and resp.chunked)  # (HEAD: length 0)
    chunked = resp.length is None and req.version == "HTTP/1.1"  # 1.0: delimited by closing
    if resp.length is None:  # not framed by length: chunks, or until the upstream closes
        headers.append(("X-Accel-Buffering", "no"))  # so an nginx in front does not buffer
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    framer = Framer(chunked, resp.getheader("content-type"))
    return resp.status, response_head(resp.status, headers, not req.keep_alive), reader, framer

# ================================================================================ Connections

class Connection:
    """A non-blocking socket owned by the loop: derived interest, buffered send, one deadline."""
    client = upstream = None  # the two ends of an exchange, where this is one of them
    def __init__(self, gw, sock=None, out=()):  # a subclass first sets what its wants() reads
        self.gw, self.events, self.outbuf = gw, 0, bytearray().join(out)
        self.sock = sock or socket.socket(gw.upstream_family, socket.SOCK_STREAM)
        self.deadline, self.sent, self.closed = time.monotonic() + self.patience, 0, False
        self.sock.setblocking(False)
        if sock is None:  # a socket of our own, to Ollama (an Upstream, the Probe): writable
            self.sock.connect_ex(gw.upstream_addr)  # once connected, or once that failed
        gw.conns.add(self)
        self.update()

    def update(self):
        """Register the events wants() derives from the state: the one caller of the selector."""
        want = 0 if self.closed else self.wants()
        if want != self.events:  # changes are rare (backpressure, the request sent)
            if self.events:
                self.gw.sel.unregister(self.sock)
            if want:
                self.gw.sel.register(self.sock, want, self)
            self.events = want

    def on_event(self, mask):
        """Send what waits; hand what arrived (b"" when the peer is gone) to received()."""
        if mask & WRITE:
            self.send()
        if mask & READ and not self.closed:
            try:
                data = self.sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except OSError as e:
                return self.lost(e)
            self.received(data)

    def send(self, data=b""):
        """Queue data and send what the socket takes now; the deadline moves only on progress."""
        waiting, self.sent = bool(self.outbuf), self.sent + len(data)
        self.outbuf += data
        try:
            sent = self.sock.send(self.outbuf) if self.outbuf else 0
        except BlockingIOError:
            sent = 0
        except OSError as e:
            return self.lost(e)
        del self.outbuf[:sent]
        if not self.outbuf:
            self.drained()
        elif sent or not waiting:
            self.deadline = time.monotonic() + self.patience

    def close(self):
        """Unregister, then close; closing twice is harmless (each step is)."""
        self.closed = True
        self.gw.conns.discard(self)
        self.update()  # closed, it wants nothing: unregistered before the socket closes
        self.sock.close()

class Client(Connection):
    """One client connection: reads requests in order, answers or forwards each, writes back."""
    request = status = first_byte = None  # the request read or served, its head's status and time
    closing, more, searched = False, False, 0  # see drained, advance
    def __init__(self, gw, sock, addr):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.addr, self.inbuf = "%s:%s" % addr[:2], bytearray()
        self.patience = gw.args.client_timeout  # to send a whole request, to take output
        super().__init__(gw, sock)

    def wants(self):
        """Read unless output piles up (so a client that leaves is seen); write while it waits."""
        full = len(self.outbuf) > HIGH_WATER  # then its stall deadline watches it
        return (0 if full else READ) | (WRITE if self.outbuf or self.more else 0)

    def received(self, data):
        if not data:
            return self.close()  # the client left: close() also cancels its upstream
        # more pipelined than is kept: the response under way is the last, and what still comes
        self.closing = self.closing or len(self.inbuf) > READ_SIZE  # is dropped, as after an error
        if not self.closing:
            self.inbuf += data

    def lost(self, error):
        self.close()

    def on_timeout(self, now):
        if self.closing or self.outbuf or self.more or (self.request is None and not self.inbuf):
            return self.close()  # done lingering, not taking its output, or idle
        self.respond(408, "request not received in %gs" % self.patience, close=True)

    def drained(self):
        """All output is out: linger when closing, else wait for the upstream or a request."""
        if self.closing and not self.upstream:  # shut our side, read till the client hangs up:
            with suppress(OSError):  # a reset now could destroy the answer before it is read
                self.sock.shutdown(socket.SHUT_WR)  # (if it fails, the client is gone: the read
            self.deadline = time.monotonic() + LINGER  # that READ reports at once closes it)
        else:  # while an upstream works, its own deadline governs
            self.deadline = NEVER if self.upstream else time.monotonic() + self.patience

    def advance(self):
        """Start the requests waiting in inbuf, in order, a few a turn while the output leaves."""
        self.more = False
        try:
            for _ in range(4):  # so that nobody waits behind a client that pipelines many
                if self.closed or self.closing or self.upstream or self.outbuf:  # (WRITE: once out)
                    return
                if self.request is None:
                    head = read_head(self.inbuf, self.searched)
                    self.searched = len(self.inbuf) if head is None else 0
                    if head is None:
                        return
                    self.request = req = Request(head, self.gw.args.max_body)
                    req.user = self.gw.access.check(req)  # refused before its body is read
                    expects = req.fields.get("expect", [""])[0].lower() == "100-continue"
                    if expects and req.version == "HTTP/1.1" and not (self.inbuf or req.body.done):
                        self.send(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits 1 s otherwise
                self.request.parts.append(self.request.body.read(self.inbuf))
                if not self.request.body.done:
                    return
                self.dispatch()
            self.more = not self.upstream  # the rest next turn (after an upstream: at its end)
        except ProtocolError as e:  # hang up after it: where the next request starts is unknown
            self.respond(e.status, str(e), extra=e.headers, close=True)

    def dispatch(self):
        """The whole request is here: answer it ourselves, or send it upstream in a slot."""
        gw, req = self.gw, self.request
        if req.path.startswith("/qlite/"):  # our own endpoints are never forwarded
            return self.respond(*gw.own_endpoint(req))
        kind = "light" if LIGHT.fullmatch("%s %s" % (req.method, req.path)) else "active"
        busy = gw.in_flight(kind)
        if kind == "active" and req.user and 0 < gw.args.max_per_key <= busy.count(req.user):
            gw.access.use[req.user]["rejected"] += 1  # the key holds its share
            return self.respond(429, "this key holds its share, %d generations at once: retry "
                                "when one ends" % gw.args.max_per_key, extra=RETRY_SOON)
        if len(busy) >= gw.args.max_active:
            gw.counters["rejected"] += 1
            return self.respond(503, "all slots are busy, retry shortly", extra=RETRY_SOON)
        try:
            self.upstream = Upstream(gw, self, kind, upstream_request(
                req, gw.upstream_host, gw.access.required))
        except OSError as e:  # no descriptor left for it: refuse this request, serve on
            return self.respond(503, "cannot reach the upstream: %s" % e.strerror, extra=RETRY_SOON)
        self.deadline = NEVER  # nothing is unsent (advance waits for that): the upstream rules

    def begin(self, status):  # a response head leaves now
        self.status, self.first_byte, self.sent = status, time.monotonic(), 0

    def respond(self, status, body, content_type="application/json", extra=(), close=False):
        """Answer the current request ourselves; body is bytes, or an error message."""
        req = self.request
        if isinstance(body, str):  # the JSON error clients expect: Ollama's, or OpenAI's on /v1/
            error = {"message": body, "param": None, "code": None, "type": ERROR_TYPES.get(
                status, "invalid_request_error" if status < 500 else "api_error")}
            v1 = req and req.path.startswith("/v1/")
            body = json.dumps({"error": error if v1 else body}).encode()
        close = close or req is None or not req.keep_alive or self.gw.draining > 0
        headers = [("Content-Type", content_type), ("Content-Length", len(body)),
                   ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()))]
        self.begin(status)
        self.end_response(response_head(status, headers + list(extra), close)
                          + (b"" if req and req.method == "HEAD" else body), close)

    def end_response(self, data, close=False):
        """Queue the response's last bytes (None: cut it short), log it; hang up or read on."""
        keep = self.request and self.request.keep_alive and not self.gw.draining
        self.closing, self.upstream = self.closing or close or data is None or not keep, None
        self.send(data or b"")
        if not self.closed:  # (else close() has logged it)
            self.finish(self.status)

    def finish(self, status):
        """The request is over: count it, in all and for its key, log it, and forget it."""
        gw, req = self.gw, self.request
        gw.codes[status] += 1
        gw.counters["response_bytes"] += self.sent
        gw.access.use[req.user if req else ""]["requests"] += 1
        if not gw.args.quiet:
            user, method, target, took = (req.user or "-", req.method, req.target, "%.3fs" % (
                time.monotonic() - req.started)) if req else ("-", "-", "-", "0.000s")
            ttfb = "%.3fs" % (self.first_byte - req.started) if self.first_byte and req else "-"
            sys.stderr.write('%s %s "%s %s" %d %dB ttfb=%s %s\n' % (
                self.addr, user, method, target, status, self.sent, ttfb, took))
        self.request, self.status, self.first_byte, self.sent = None, None, None, 0

    def close(self):
        """Hang up; a request under way is logged (once) and its upstream closed (Ollama stops)."""
        if self.request:  # 499 only when it left before the response head, as nginx does
            self.gw.counters["streams_left_early"] += self.status is not None
            self.finish(499 if self.status is None else self.status)
        if self.upstream:
            self.upstream.close()
        super().close()

class Upstream(Connection):
    """One request forwarded to Ollama, in a slot: connect, send, read the head, stream the body."""
    def __init__(self, gw, client, kind, wire):
        self.client, self.kind, self.inbuf = client, kind, bytearray()
        self.reader = self.framer = None  # once the response head is here
        self.patience = min(CONNECT_TIMEOUT, gw.args.upstream_timeout)  # to take the request
        super().__init__(gw, None, wire)  # wire leaves once writable (outside advance)

    def wants(self):
        """Write the request; then read, unless the client has too much unsent output."""
        return WRITE if self.outbuf else 0 if len(self.client.outbuf) > HIGH_WATER else READ

    def drained(self):
        """The whole request is out: from now on Ollama may think in silence."""
        self.deadline = time.monotonic() + self.gw.args.upstream_timeout

    def lost(self, error):
        self.end("upstream connection failed: %s" % (error.strerror or error))

    def received(self, data):
        """The head, then body bytes, re-framed for the client; bad framing fails the stream."""
        out = b""  # the client's head and the first body bytes leave in one send
        try:
            if not data:  # only a body read until the connection closes may end with it
                early = not self.reader or self.reader.left != NEVER
                return self.end("upstream closed the connection early" if early else None)
            self.deadline = time.monotonic() + self.gw.args.upstream_timeout
            self.inbuf += data
            while self.reader is None:
                head = read_head(self.inbuf, 0, 502)
                if head is None:
                    return
                if not INTERIM.match(head):  # an interim 1xx response (103 Early Hints) is dropped
                    out = self.start(head)
            out += self.framer.frame(self.reader.read(self.inbuf))
        except ProtocolError as e:
            self.client.send(out + (self.framer.frame(e.decoded) if e.decoded else b""))
            return self.end(str(e), e.status)
        self.client.send(out)
        if self.reader.done:  # (end() does nothing if the client's leaving closed this already)
            self.end()

    def start(self, head):
        """The final response head is here: how to read and frame the body; the client's head."""
        req = self.client.request
        req.keep_alive = req.keep_alive and not self.gw.draining  # (the last answer)
        status, head, self.reader, self.framer = plan_response(head, req)
        self.gw.observe_ttfb(time.monotonic() - req.started)
        self.client.begin(status)
        return head

    def end(self, error=None, status=502):
        """End the exchange; a failure is an error response before the head, a record after."""
        if self.closed:
            return
        self.gw.counters["upstream_errors"] += bool(error)
        self.close()
        if self.reader is None:
            self.client.respond(status, error)
        else:  # what Ollama counted, from the end of the body (though it then broke)
            self.gw.observe_usage(self.gw.access.use[self.client.request.user], self.framer.tail)
            self.client.end_response(self.framer.end(error))

    def on_timeout(self, now):
        if self.wants():
            return self.end("upstream did not answer in time", 504)
        self.deadline = now + self.gw.args.upstream_timeout  # paused: the client's deadline rules

class Probe(Connection):
    """A bare connect to Ollama, once a second: whether it can be reached, or why not."""
    patience = PROBE_EVERY

    def wants(self):
        return WRITE

    def drained(self):
        """Writable: the connect has ended, one way or the other."""
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.gw.down = "upstream connection failed: %s" % os.strerror(error) if error else None
        self.close()

    def on_timeout(self, now):
        self.gw.down = "upstream did not accept a connection in %gs" % PROBE_EVERY
        self.close()

# ================================================================================ Access

class Access:
    """Who may do what: whose each key is, what each key used, the admin lock."""
    def __init__(self, args):
        self.args, self.required, self.keys = args, bool(args.api_key or args.keys), read_keys(args)
        self.use = defaultdict(Counter)  # what each key used, by name ("": no key), see USE

    def reload(self, signum=None, frame=None):
        """SIGHUP: read the keys again; a file that fails keeps the old ones, said in one line."""
        try:
            self.keys = read_keys(self.args)
            sys.stderr.write("qlite: keys re-read: %d in force\n" % len(self.keys))
        except ValueError as e:
            sys.stderr.write("qlite: keys not re-read, the old ones stay: %s\n" % e)

    def check(self, req):
        """The name of the request's key; ProtocolError if the key or the admin lock forbids it."""
        scheme, _, token = req.fields.get("authorization", [""])[0].partition(" ")
        name = self.keys.get(sha256(token.strip(" "))) if scheme.lower() == "bearer" else None
        preflight = req.method == "OPTIONS" and "access-control-request-method" in req.fields
        if self.required and name is None and req.path != "/qlite/health" and not preflight:
            raise ProtocolError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                [("WWW-Authenticate", "Bearer")])  # (scheme in any case)
        # model management, on the path as Ollama's router reads it
        if ADMIN.match(posixpath.normpath(unquote(req.path))) and not self.args.allow_admin:
            raise ProtocolError(403, "model management is off: start qlite.py with --allow-admin")
        return name or ""

    def metrics(self, active):
        """Each key's use as Prometheus lines, labelled with its name, never the key."""
        lines, names = [], sorted((set(self.keys.values()) | set(self.use) | set(active)) - {""})
        for what in USE:
            metric = "qlite_key_" + what + ("" if what == "active" else "_total")
            lines.append("# TYPE %s %s" % (metric, "gauge" if what == "active" else "counter"))
            lines += ['%s{key="%s"} %d' % (metric, name, active.count(name) if what == "active"
                                           else self.use[name][what]) for name in names]
        return lines

# ================================================================================ The loop

class Gateway(Connection):
    """The listening socket, the selector, the slots, the counters and the loop."""
    patience = 0.0  # its deadline: when to probe Ollama next (the first time at once)

    def __init__(self, args):
        self.args, self.access, self.sel = args, Access(args), selectors.DefaultSelector()
        self.codes, self.ttfb_counts, self.ttfb_sum = Counter(), [0] * (len(TTFB_BUCKETS) + 1), 0.0
        self.counters = {"rejected": 0, "upstream_errors": 0, "streams_left_early": 0,
                         "response_bytes": 0, "generated_tokens": 0, "generation_seconds": 0.0}
        self.conns, self.draining = set(), 0.0  # draining: when the drain after a signal ends
        self.paused, self.down = False, None  # down: None, or why the probe failed to reach Ollama
        host, port = args.upstream
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # once, at start-up
        self.upstream_family, *_, self.upstream_addr = min(  # IPv4 first: "localhost" may give
            infos, key=lambda info: info[0] != socket.AF_INET)  # ::1 first; Ollama is on 127.0.0.1
        self.upstream_host = "%s:%d" % ("[%s]" % host if ":" in host else host, port)
        super().__init__(self, socket.create_server((args.host, args.port), backlog=1024,
                         family=socket.AF_INET6 if ":" in args.host else socket.AF_INET))

    def wants(self):
        return 0 if self.paused else READ

    def on_event(self, mask):
        """Accept a client; if that fails (out of descriptors), pause till the next probe."""
        try:
            Client(self, *self.sock.accept())  # (the socket, its address)
        except OSError:  # (a readiness with nobody to accept too: a short pause is harmless)
            self.paused = True

    def on_timeout(self, now):  # the next probe is due; a pause in accepting ends too
        with suppress(OSError):  # out of descriptors: the next one tries again
            Probe(self)
        self.paused, self.deadline = False, time.monotonic() + PROBE_EVERY  # the probe's is earlier

    def in_flight(self, kind):
        """The key names of the requests of this kind with Ollama now (derived: never stale)."""
        return [c.request.user for c in self.conns if c.upstream and c.upstream.kind == kind]

    def observe_ttfb(self, seconds):  # counted in its own bucket: the page cumulates them
        self.ttfb_sum += seconds
        self.ttfb_counts[bisect.bisect_left(TTFB_BUCKETS, seconds)] += 1

    def observe_usage(self, use, tail):
        """Count the tokens Ollama reported at the end of an answer, for its key and in all."""
        found = {key.decode(): int(n) for key, n in USAGE.findall(tail)}  # the last of each
        use["prompt_tokens"] += found.get("prompt_eval_count", found.get("prompt_tokens", 0))
        use["completion_tokens"] += found.get("eval_count", found.get("completion_tokens", 0))
        if "eval_duration" in found:  # Ollama's own API: tokens per second can be told
            self.counters["generated_tokens"] += found.get("eval_count", 0)
            self.counters["generation_seconds"] += found["eval_duration"] / 1e9

    def metrics_page(self):
        """/qlite/metrics in the Prometheus text format."""
        active, light = self.in_flight("active"), self.in_flight("light")
        gauges = {"active_requests": len(active), "light_requests": len(light),
                  "max_active_requests": self.args.max_active, "upstream_up": int(not self.down)}
        lines = ["# TYPE qlite_%s gauge\nqlite_%s %d" % (n, n, v) for n, v in gauges.items()]
        lines.append("# TYPE qlite_requests_total counter")
        lines += ['qlite_requests_total{code="%d"} %d' % c for c in sorted(self.codes.items())]
        lines += ["# TYPE qlite_%s_total counter\nqlite_%s_total %r" % (n, n, v)
                  for n, v in self.counters.items()]
        lines.append("# TYPE qlite_time_to_first_byte_seconds histogram")
        lines += ['qlite_time_to_first_byte_seconds_bucket{le="%s"} %d' % bucket for bucket
                  in zip(TTFB_BUCKETS + ("+Inf",), itertools.accumulate(self.ttfb_counts))]
        lines += ["qlite_time_to_first_byte_seconds_sum %r" % self.ttfb_sum,
                  "qlite_time_to_first_byte_seconds_count %d" % sum(self.ttfb_counts)]
        return ("\n".join(lines + self.access.metrics(active)) + "\n").encode()

    def own_endpoint(self, req):
        """Q-Lite's own endpoints: (status, body[, content type, headers]) for respond()."""
        if req.path not in ("/qlite/health", "/qlite/metrics"):
            return 404, "no such Q-Lite endpoint"
        if req.method not in ("GET", "HEAD"):
            return 405, "use GET or HEAD", "application/json", [("Allow", "GET, HEAD")]
        if req.path == "/qlite/metrics":
            return 200, self.metrics_page(), "text/plain; version=0.0.4; charset=utf-8"
        status = "draining" if self.draining else "down" if self.down else "ok"
        health = dict(status=status, max_active=self.args.max_active, error=self.down,
                      upstream="http://" + self.upstream_host, active=len(self.in_flight("active")),
                      light=len(self.in_flight("light")))
        return 200 if status == "ok" else 503, json.dumps(health).encode()

    def call(self, conn, callback, *args):
        """Run one callback; whatever it raises ends that exchange only, never the loop."""
        client = conn.client or conn  # an upstream's exchange is its client's
        try:
            if not conn.closed:
                callback(*args)
            if client.upstream:  # (an upstream that ran is its client's, or done with)
                client.upstream.update()
            elif isinstance(client, Client):  # nothing upstream: start the requests waiting
                client.advance()  # (new ones, or the next once the last answer is done with)
            client.update()
        except Exception:
            traceback.print_exc()
            if client is not self:
                client.close()

    def run(self):
        """The loop: sweep deadlines, dispatch events, drain after a signal."""
        next_sweep = 0.0
        while not self.draining or (time.monotonic() < self.draining
                                    and any(isinstance(c, Client) for c in self.conns)):
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + TICK
                self.sweep(time.monotonic())
            for key, mask in self.sel.select(TICK):
                self.call(key.data, key.data.on_event, mask)

    def sweep(self, now):
        """Drain after a signal; time out what waited too long (the listener: probe Ollama)."""
        if self.draining and not self.closed:  # stop listening, close idle clients; requests
            self.close()  # in flight may run till the drain ends
            for conn in [c for c in self.conns if isinstance(c, Client)]:
                if conn.request is None and not (conn.outbuf or conn.inbuf or conn.closing):
                    conn.close()
        for conn in [c for c in self.conns if now >= c.deadline]:
            self.call(conn, conn.on_timeout, now)

    def on_signal(self, signum, frame):
        """The first signal drains, a second one exits at once."""
        if self.draining:
            raise SystemExit(1)  # a second signal: stop now
        self.draining = time.monotonic() + DRAIN  # the next sweep drains; new connections
        with suppress(OSError):  # are refused now
            self.sock.shutdown(socket.SHUT_RD)

def main(argv=None):
    """Start Q-Lite: read the keys, raise the descriptor limit, listen, say where, run the loop."""
    args = parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with suppress(ValueError, OSError):  # a thousand idle connections need descriptors
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:  # a mistake is one line on stderr and exit status 1 (2 for the keys, as for flags)
        gw = Gateway(args)
    except (socket.gaierror, UnicodeError) as e:  # (UnicodeError: a name IDNA cannot encode)
        sys.exit("qlite: cannot resolve upstream %r: %s" % (args.upstream[0], e))
    except ValueError as e:
        sys.stderr.write("qlite: %s\n" % e)
        return 2
    except OSError as e:
        sys.exit("qlite: cannot listen on %s:%d: %s" % (args.host, args.port, e.strerror or e))
    for signum in (signal.SIGTERM, signal.SIGINT):  # before the line that says we listen
        signal.signal(signum, gw.on_signal)
    signal.signal(signal.SIGHUP, gw.access.reload)
    host, port = gw.sock.getsockname()[:2]
    sys.stderr.write("qlite: listening on http://%s:%d, upstream http://%s, max %d active%s\n" % (
        "[%s]" % host if ":" in host else host, port, gw.upstream_host, args.max_active,
        ", keys: %d" % len(gw.access.keys) if gw.access.required else ""
        if host in ("127.0.0.1", "::1")
        else " (no --api-key or --keys: anyone who can reach this port can use the model)"))
    gw.run()  # (returns None: exit status 0)

if __name__ == "__main__":
    sys.exit(main())

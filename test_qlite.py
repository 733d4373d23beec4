"""Tests for qlite.py: real sockets on 127.0.0.1, a fake Ollama, assertions on bytes.

The fake Ollama below speaks HTTP/1.1 the way Ollama does (see ollama-wire.md): NDJSON streams
with one line per chunk, `Date` and `Content-Type` only, JSON errors. What it does is chosen by
fields in the request's JSON body, so the same fake can run in its own process for the benchmark:
`python test_qlite.py --fake-ollama PORT`.
"""

import json
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
QLITE = os.path.join(HERE, "qlite.py")
sys.path.insert(0, HERE)
import qlite  # noqa: E402  (the pure wire helpers are tested directly too)

TIMEOUT = 10.0


def wait_for(condition, timeout=TIMEOUT, message="condition"):
    """Poll until condition() is true; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out waiting for " + message)


# ======================================================================== fake Ollama

def rss_kib(pid):
    """Resident memory of a process, in KiB."""
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def http_date():
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())


class FakeOllama:
    """An Ollama look-alike: one thread per connection, keep-alive, scripted misbehaviour."""

    def __init__(self, port=0):
        self.listener = socket.create_server(("127.0.0.1", port), backlog=512)
        self.port = self.listener.getsockname()[1]
        self.requests = []              # every request received: dicts
        self.peer_closed = 0            # streams whose client hung up while we were working
        self.sent_bytes = 0             # stream bytes written, to see backpressure take hold
        self.connections = 0
        self.release = threading.Event()  # lets held streams finish
        self.lock = threading.Condition()
        self.running = True
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def stop(self):
        self.running = False
        self.release.set()
        try:  # wakes the accept() in progress, which close() alone leaves taking one more
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def count(self, path):
        with self.lock:
            return sum(1 for r in self.requests if r["path"] == path)

    def accept_loop(self):
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
                hmap = {k.lower(): v for k, v in headers}
                length = int(hmap.get("content-length", 0))
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                req = {"method": method, "target": target, "path": target.split("?")[0],
                       "headers": headers, "hmap": hmap, "body": body, "raw_head": head}
                with self.lock:
                    self.requests.append(req)
                    self.lock.notify_all()
                if not self.respond(conn, req):
                    return
        except OSError:
            pass
        finally:
            conn.close()

    # ---- helpers for responses
    def wait_peer(self, conn, timeout=60.0):
        """Wait for release or for the client to hang up; True when it hung up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.release.is_set():
            readable, _, _ = select.select([conn], [], [], 0.02)
            if readable:
                try:
                    if conn.recv(1, socket.MSG_PEEK) == b"":
                        raise ConnectionResetError
                except OSError:
                    with self.lock:
                        self.peer_closed += 1
                        self.lock.notify_all()
                    return True
        return False

    def peer_gone(self, conn):
        readable, _, _ = select.select([conn], [], [], 0)
        if readable:
            try:
                return conn.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True
        return False

    @staticmethod
    def reset(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def send_head(self, conn, status, ctype, extra=""):
        reason = {200: "OK", 201: "Created", 400: "Bad Request", 403: "Forbidden",
                  404: "Not Found", 500: "Internal Server Error",
                  503: "Service Unavailable"}.get(status, "Status")
        conn.sendall(("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nDate: %s\r\n%s\r\n"
                      % (status, reason, ctype, http_date(), extra)).encode())

    def send_json(self, conn, status, obj, ctype="application/json; charset=utf-8"):
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        if len(body) <= 2048:  # Go's net/http: a length for small bodies, chunks above that
            self.send_head(conn, status, ctype, "Content-Length: %d\r\n" % len(body))
            conn.sendall(body)
        else:
            self.send_head(conn, status, ctype, "Transfer-Encoding: chunked\r\n")
            conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        return True

    # ---- routes
    def respond(self, conn, req):
        path, method = req["path"], req["method"]
        host = req["hmap"].get("host", "")
        if host not in ("127.0.0.1:%d" % self.port, "localhost:%d" % self.port):
            self.send_head(conn, 403, "text/plain", "Content-Length: 0\r\n")
            return True
        if path == "/" and method in ("GET", "HEAD"):
            self.send_head(conn, 200, "text/plain; charset=utf-8", "Content-Length: 17\r\n")
            if method == "GET":
                conn.sendall(b"Ollama is running")
            return True
        if path == "/api/version":
            return self.send_json(conn, 200, {"version": "0.12.6"})
        if path == "/close-after":  # answers as if keeping the connection, then drops it
            self.send_json(conn, 200, {"version": "0.12.6"})
            return False
        if path == "/api/show":  # a light request; {"hold": true} keeps it in flight
            if json.loads(req["body"] or b"{}").get("hold") and self.wait_peer(conn):
                return False
            return self.send_json(conn, 200, {"modelfile": "FROM fake", "details": {}})
        if path == "/api/tags":
            return self.send_json(conn, 200, {"models": [{"name": "fake:latest", "model": "fake:latest"}]})
        if path == "/echo":  # what reached the upstream, for header and body assertions
            return self.send_json(conn, 200, {"method": method, "target": req["target"],
                                              "headers": req["headers"],
                                              "body": req["body"].decode("latin-1")})
        if path in ("/api/delete", "/api/copy") and method in ("DELETE", "POST"):
            self.send_head(conn, 200, "text/plain", "Content-Length: 0\r\n")
            return True
        if path in ("/api/generate", "/api/chat", "/api/pull", "/v1/chat/completions", "/raw"):
            try:
                opts = json.loads(req["body"] or b"{}")
            except ValueError:
                return self.send_json(conn, 400, {"error": "invalid JSON"})
            opts = opts if isinstance(opts, dict) else {}
            opts.update(opts.get("options") or {})  # the ollama client's `options=` works too
            return self.generate(conn, path, opts)
        self.send_head(conn, 404, "text/plain", "Content-Length: 18\r\n")
        conn.sendall(b"404 page not found")
        return True

    def generate(self, conn, path, opts):
        """Stream tokens as Ollama would; options in the body script delays and failures."""
        n, delay = int(opts.get("n", 3)), float(opts.get("delay", 0))
        fail, fail_after = opts.get("fail"), int(opts.get("fail_after", 1))
        if "status" in opts:
            return self.send_json(conn, int(opts["status"]), {"error": opts.get("error", "boom")})
        if fail == "silent":
            self.wait_peer(conn)
            return False
        if fail == "reset_now":
            self.reset(conn)
            return False
        if fail == "close_now":
            return False
        if fail == "head_and_badchunk":  # head, a line and bad framing in one write
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (
                             len(self.records(path, opts, 1)[0]), self.records(path, opts, 1)[0])
                         + b"zz\r\nnot a chunk\r\n")
            self.wait_peer(conn, 5)
            return False
        if opts.get("hold_before_head"):
            if self.wait_peer(conn):
                return False
        for code in opts.get("interim", ()):  # 1xx interim responses before the real one
            conn.sendall(b"HTTP/1.1 %d Interim\r\nLink: </s.css>; rel=preload\r\n\r\n" % code)
        sse = path.startswith("/v1/")
        records = self.records(path, opts, n)
        if opts.get("stream") is False and sse:
            return self.send_json(conn, 200, {
                "id": "c1", "object": "chat.completion", "created": 1, "model": "fake",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "tok0"}}]})
        if opts.get("stream") is False:
            return self.send_json(conn, 200, json.loads(records[-1]))
        ctype = opts.get("ctype") or {"/raw": "text/plain",
                                      "/v1/chat/completions": "text/event-stream"}.get(
            path, "application/x-ndjson")
        framing = opts.get("framing", "chunked")
        extra = "Transfer-Encoding: chunked\r\n" if framing == "chunked" else (
            "Content-Length: %d\r\n" % sum(map(len, records)) if framing == "length" else "")
        self.send_head(conn, 200, ctype, extra)
        merge, split = int(opts.get("merge", 1)), int(opts.get("split", 0))
        wire_split = int(opts.get("wire_split", 0))
        sent = 0
        for i in range(0, len(records), merge):
            if fail and sent >= fail_after:
                return self.fail_stream(conn, fail)
            if opts.get("hold") and i == merge:
                if self.wait_peer(conn):
                    return False
            if delay and i:
                time.sleep(delay)
                if self.peer_gone(conn):
                    with self.lock:
                        self.peer_closed += 1
                        self.lock.notify_all()
                    return False
            group = records[i:i + merge]
            if opts.get("stamp"):
                group = [r.replace(b'"t":0', b'"t":%r' % time.monotonic()) for r in group]
            payload = b"".join(group)
            if framing == "chunked":
                pieces = [payload[j:j + split] for j in range(0, len(payload), split)] \
                    if split else [payload]
                wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
            else:
                wire = payload
            self.sent_bytes += len(wire)
            if wire_split:
                for j in range(0, len(wire), wire_split):
                    conn.sendall(wire[j:j + wire_split])
                    time.sleep(0.001)
            else:
                conn.sendall(wire)
            sent += len(group)
        if opts.get("hold_end") and self.wait_peer(conn):  # all records out, the end held back
            return False
        if framing == "chunked":
            conn.sendall(b"0\r\n\r\n")
            return True
        return framing == "length"

    def fail_stream(self, conn, fail):
        if fail == "reset":
            self.reset(conn)
        elif fail == "truncate":
            conn.sendall(b"40\r\n{\"partial\":")
        elif fail == "badchunk":
            conn.sendall(b"zz\r\nnot a chunk\r\n")
            self.wait_peer(conn, 5)
        elif fail == "stall":
            self.wait_peer(conn)
        return False

    def records(self, path, opts, n):
        """The NDJSON lines or SSE events of a generation of n tokens."""
        pad = "x" * int(opts.get("pad", 0))
        stamp = ',"t":0' if opts.get("stamp") else ""
        out = []
        for i in range(n):
            if path == "/v1/chat/completions":
                out.append(b'data: {"id":"c1","object":"chat.completion.chunk","created":1,'
                           b'"model":"fake","choices":[{"index":0,"delta":{"role":"assistant",'
                           b'"content":"tok%d%s"},"finish_reason":null}]%s}\n\n'
                           % (i, pad.encode(), stamp.encode()))
            elif path == "/api/chat":
                out.append(b'{"model":"fake","created_at":"2025-01-01T00:00:00Z","message":'
                           b'{"role":"assistant","content":"tok%d%s"},"done":false%s}\n'
                           % (i, pad.encode(), stamp.encode()))
            elif path == "/raw":
                out.append(b"raw text %d %s\n" % (i, pad.encode()))
            else:
                out.append(b'{"model":"fake","created_at":"2025-01-01T00:00:00Z",'
                           b'"response":"tok%d%s","done":false%s}\n'
                           % (i, pad.encode(), stamp.encode()))
        if path == "/v1/chat/completions":
            out.append(b'data: {"id":"c1","object":"chat.completion.chunk","created":1,'
                       b'"model":"fake","choices":[{"index":0,"delta":{},'
                       b'"finish_reason":"stop"}]}\n\n')
            out.append(b"data: [DONE]\n\n")
            out = sse_framing(out, opts.get("sse", "lf"))
        elif path in ("/api/generate", "/api/chat"):
            msg = b'"message":{"role":"assistant","content":""},' if path == "/api/chat" \
                else b'"response":"",'
            out.append(b'{"model":"fake","created_at":"2025-01-01T00:00:00Z",%s"done":true,'
                       b'"done_reason":"stop","total_duration":5000000,"load_duration":1000,'
                       b'"prompt_eval_count":4,"prompt_eval_duration":2000,"eval_count":%d,'
                       b'"eval_duration":%d}\n' % (msg, n, n * 20000000))
        return out


SSE_FRAMINGS = ("lf", "crlf", "mixed_ping", "cr", "nospace", "comments", "named",
                "no_done", "error_then_done", "error_no_done")


def sse_framing(events, style):
    """The same events framed the way one real server does (see stream-framings.md)."""
    if style == "error_then_done" or style == "error_no_done":  # vLLM and TGI; llama.cpp
        events = events[:1] + [b'data: {"error": {"message": "model crashed"}}\n\n'] + (
            events[-1:] if style == "error_then_done" else [])
    if style == "no_done":  # TGI /generate_stream, llama.cpp native
        events = events[:-1]
    if style == "nospace":  # TGI before mid-2024
        events = [e.replace(b"data: ", b"data:") for e in events]
    if style == "named":  # Anthropic- and Responses-style endpoints
        events = [b"event: message\n" + e for e in events]
    if style == "comments":  # keep-alive comment-only events (llama.cpp, TGI)
        events = [x for e in events for x in (b":\n\n", e)]
    if style == "mixed_ping":  # old sse-starlette: LF data, pings that ignore the separator
        events = [x for e in events for x in (e, b": ping - 2026-11-21 10:00:00.000000\r\n\r\n")]
    if style == "crlf":  # sse-starlette's default separator
        events = [e.replace(b"\n", b"\r\n") for e in events]
    if style == "cr":  # allowed by the format; sse-starlette with sep="\r"
        events = [e.replace(b"\n", b"\r") for e in events]
    return events


# ======================================================================== clients and gateways

class Response:
    def __init__(self, status, reason, headers, body, chunks, complete):
        self.status, self.reason, self.headers = status, reason, headers
        self.body, self.chunks, self.complete = body, chunks, complete

    def header(self, name):
        return self.headers.get(name.lower())

    def json(self):
        return json.loads(self.body)


class Conn:
    """A raw HTTP/1.1 client connection that keeps chunk boundaries for assertions."""

    def __init__(self, port, timeout=TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def close(self):
        self.rfile.close()
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def request(self, method, path, body=None, headers=(), read=True):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: gateway.test"]
        lines += ["%s: %s" % h for h in headers]
        if body is not None:
            lines.append("Content-Length: %d" % len(body))
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        return self.response(method) if read else None

    def head(self):
        """Read a response head; return (status, reason, headers) (100 Continue included)."""
        line = self.rfile.readline()
        if not line:
            raise ConnectionError("connection closed before a response")
        _, status, reason = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers = {}
        while True:
            line = self.rfile.readline().decode("latin-1").rstrip("\r\n")
            if not line:
                break
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        return int(status), reason, headers

    def response(self, method="GET"):
        status, reason, headers = self.head()
        while status == 100:
            status, reason, headers = self.head()
        body, chunks, complete = b"", None, True
        if method == "HEAD" or status in (204, 304):
            pass
        elif headers.get("transfer-encoding") == "chunked":
            chunks, complete = self.read_chunks()
            body = b"".join(chunks)
        elif "content-length" in headers:
            body = self.rfile.read(int(headers["content-length"]))
            complete = len(body) == int(headers["content-length"])
        else:
            body = self.rfile.read()
        return Response(status, reason, headers, body, chunks, complete)

    def read_chunks(self):
        chunks = []
        try:
            while True:
                line = self.rfile.readline()
                if not line.endswith(b"\r\n"):
                    return chunks, False
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    assert self.rfile.readline() == b"\r\n", "no CRLF after the last chunk"
                    return chunks, True
                data = self.rfile.read(size + 2)
                if len(data) < size + 2:
                    return chunks, False
                assert data.endswith(b"\r\n"), "chunk data not followed by CRLF"
                chunks.append(data[:-2])
        except (ConnectionError, socket.timeout):
            return chunks, False

    def read_chunk(self):
        """Read exactly one chunk of a streamed body (None at the terminator)."""
        size = int(self.rfile.readline().split(b";")[0], 16)
        if size == 0:
            self.rfile.readline()
            return None
        data = self.rfile.read(size + 2)
        return data[:-2]

    def closed_by_peer(self, timeout=TIMEOUT):
        """True when the gateway hangs up (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.rfile.read() is not None and self.sock.recv(1) == b""
        except ConnectionError:
            return True
        except socket.timeout:
            return False


class GatewayProcess:
    """qlite.py in a child process on a free port; its stderr is collected line by line."""

    def __init__(self, upstream_port, *flags, env=None):
        cmd = [sys.executable, QLITE, "--host", "127.0.0.1", "--port", "0",
               "--upstream", "http://127.0.0.1:%d" % upstream_port] + list(flags)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines = queue.Queue()
        self.log = []
        threading.Thread(target=self.pump, daemon=True).start()
        first = self.lines.get(timeout=TIMEOUT)
        match = re.search(r"listening on http://[^ ]+:(\d+)", first or "")
        if not match:
            self.stop()
            raise AssertionError("gateway did not start: %r" % first)
        self.port = int(match.group(1))
        self.startup_line = first

    def pump(self):
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def conn(self, timeout=TIMEOUT):
        return Conn(self.port, timeout)

    def get(self, path, **kw):
        c = self.conn()
        try:
            return c.request("GET", path, **kw)
        finally:
            c.close()

    def health(self):
        return self.get("/qlite/health").json()

    def wait_idle(self):
        """Wait until no request is active (slots all freed)."""
        return wait_for(lambda: self.health()["active"] == 0, message="active == 0")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        self.proc.stderr.close()


def ndjson_lines(chunks):
    return [json.loads(c) for c in chunks]


class GatewayCase(unittest.TestCase):
    """A fake Ollama and one gateway per test class; flags can be set per class."""
    flags = ()

    @classmethod
    def setUpClass(cls):
        cls.fake = FakeOllama()
        cls.gw = GatewayProcess(cls.fake.port, *cls.flags)

    @classmethod
    def tearDownClass(cls):
        cls.gw.stop()
        cls.fake.stop()

    def setUp(self):
        self.fake.release.clear()
        self.conns = []

    def tearDown(self):
        self.fake.release.set()
        for c in self.conns:
            c.close()
        self.gw.wait_idle()

    def conn(self, timeout=TIMEOUT):
        c = self.gw.conn(timeout)
        self.conns.append(c)
        return c


# ======================================================================== streaming and framing

class StreamingTest(GatewayCase):

    def stream(self, path, opts, method="POST"):
        return self.conn().request(method, path, opts)

    def test_ndjson_one_line_per_chunk_whatever_upstream_chunking(self):
        for shape in ({}, {"merge": 5}, {"split": 7}, {"merge": 3, "split": 50},
                      {"merge": 4, "wire_split": 13}):
            with self.subTest(**shape):
                r = self.stream("/api/generate", dict(n=12, **shape))
                self.assertEqual(r.status, 200)
                self.assertEqual(r.header("content-type"), "application/x-ndjson")
                self.assertEqual(r.header("transfer-encoding"), "chunked")
                self.assertEqual(r.header("x-accel-buffering"), "no")
                self.assertTrue(r.complete)
                self.assertEqual(len(r.chunks), 13)
                for i, chunk in enumerate(r.chunks):
                    self.assertEqual(chunk.count(b"\n"), 1)
                    self.assertTrue(chunk.endswith(b"\n"))
                    if i < 12:
                        self.assertEqual(json.loads(chunk)["response"], "tok%d" % i)
                self.assertTrue(json.loads(r.chunks[-1])["done"])

    def test_each_line_leaves_the_moment_its_newline_arrives(self):
        c = self.conn()
        c.request("POST", "/api/chat", {"n": 3, "hold": True}, read=False)
        status, _, headers = c.head()
        self.assertEqual(status, 200)
        first = c.read_chunk()  # the upstream now holds the rest until released
        self.assertEqual(json.loads(first)["message"]["content"], "tok0")
        self.fake.release.set()
        rest, complete = c.read_chunks()
        self.assertTrue(complete)
        self.assertEqual(len(rest), 3)

    def test_sse_one_event_per_chunk(self):
        for shape in ({}, {"merge": 3}, {"split": 9}, {"merge": 2, "wire_split": 11}):
            with self.subTest(**shape):
                r = self.stream("/v1/chat/completions", dict(n=5, stream=True, **shape))
                self.assertEqual(r.header("content-type"), "text/event-stream")
                self.assertEqual(r.header("x-accel-buffering"), "no")
                self.assertEqual(len(r.chunks), 7)
                for chunk in r.chunks:
                    self.assertTrue(chunk.startswith(b"data: ") and chunk.endswith(b"\n\n"))
                    self.assertEqual(chunk.count(b"\n\n"), 1)
                self.assertEqual(r.chunks[-1], b"data: [DONE]\n\n")

    def test_long_line_is_forwarded_in_pieces(self):
        r = self.stream("/api/generate", {"n": 2, "pad": 3 * 1024 * 1024, "split": 65536})
        self.assertTrue(r.complete)
        lines = r.body.split(b"\n")[:-1]
        self.assertEqual(len(lines), 3)
        self.assertEqual(json.loads(lines[1])["response"], "tok1" + "x" * 3 * 1024 * 1024)
        self.assertGreater(len(r.chunks), 3)  # the long lines came in several pieces
        self.assertTrue(all(len(c) <= qlite.MAX_RECORD + qlite.READ_SIZE + 65536 for c in r.chunks))
        self.assertTrue(all(c for c in r.chunks))

    def test_content_length_passes_through(self):
        r = self.conn().request("GET", "/api/version")
        self.assertEqual((r.status, r.body), (200, b'{"version": "0.12.6"}'))
        self.assertEqual(r.header("content-length"), str(len(r.body)))
        self.assertIsNone(r.header("transfer-encoding"))
        self.assertIsNone(r.header("x-accel-buffering"))
        r = self.stream("/api/generate", {"n": 2, "stream": False})
        self.assertEqual(r.header("content-type"), "application/json; charset=utf-8")
        self.assertTrue(r.json()["done"])
        r = self.stream("/api/generate", {"n": 4, "framing": "length"})
        self.assertEqual(r.header("content-length"), str(len(r.body)))
        self.assertEqual(len(r.body.split(b"\n")), 6)

    def test_other_bodies_stream_rechunked_and_close_delimited_bodies_are_read(self):
        r = self.stream("/raw", {"n": 5, "merge": 2})
        self.assertEqual(r.header("content-type"), "text/plain")
        self.assertEqual(r.body, b"".join(b"raw text %d \n" % i for i in range(5)))
        self.assertTrue(r.complete)
        r = self.stream("/api/generate", {"n": 4, "framing": "close"})
        self.assertEqual(len(r.chunks), 5)  # re-framed one line per chunk, then terminated
        self.assertTrue(r.complete)

    def test_big_non_streamed_body_uses_upstream_chunks(self):
        r = self.stream("/api/generate", {"n": 200, "stream": False, "pad": 3000})
        self.assertEqual(r.status, 200)
        self.assertTrue(r.json()["done"])


def dechunk(body):
    """The chunks of a whole chunked body."""
    chunks = []
    while True:
        size, _, body = body.partition(b"\r\n")
        size = int(size.split(b";")[0], 16)
        if not size:
            return chunks
        chunks.append(body[:size])
        body = body[size + 2:]


def parse_sse(body):
    """The events an SSE reader dispatches (WHATWG): a {field: value} dict per event."""
    events, event = [], {}
    for line in re.split(rb"\r\n|\r|\n", body):
        if not line and event:
            events.append(event)
            event = {}
        elif line and not line.startswith(b":"):
            name, _, value = line.partition(b":")
            event[name.decode()] = value[1:].decode() if value[:1] == b" " else value.decode()
    return events


class StreamFramingTest(GatewayCase):
    """Every SSE framing real servers send (stream-framings.md): one event per chunk, at once."""
    flags = ("--upstream-timeout", "5")
    path = "/v1/chat/completions"

    def expected(self, opts):
        return self.fake.records(self.path, opts, opts["n"])

    def test_every_framing_arrives_one_event_per_chunk_byte_for_byte(self):
        for style in SSE_FRAMINGS:
            for shape in ({}, {"merge": 3}, {"split": 7}, {"merge": 2, "wire_split": 5}):
                with self.subTest(style=style, **shape):
                    opts = dict(n=3, stream=True, sse=style, **shape)
                    r = self.conn().request("POST", self.path, opts)
                    self.assertTrue(r.complete)
                    self.assertEqual(r.chunks, self.expected(opts))

    def test_each_event_leaves_the_moment_its_empty_line_arrives(self):
        for style in SSE_FRAMINGS:
            if style == "cr":
                continue  # see the next test
            with self.subTest(style=style):
                self.fake.release.clear()
                opts = dict(n=3, stream=True, sse=style, hold=True)
                c = self.conn()
                c.request("POST", self.path, opts, read=False)
                self.assertEqual(c.head()[0], 200)
                self.assertEqual(c.read_chunk(), self.expected(opts)[0])  # the fake holds the rest
                self.fake.release.set()
                self.assertEqual(c.read_chunks(), (self.expected(opts)[1:], True))

    def test_a_lone_cr_at_the_end_of_a_read_waits_for_the_next_byte(self):
        opts = dict(n=3, stream=True, sse="cr", hold=True)
        c = self.conn()
        c.request("POST", self.path, opts, read=False)
        got = b""
        while b"\r\n\r\n" not in got:
            got += c.sock.recv(65536)
        head, _, body = got.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "))
        # "data: ...\r\r" may yet go on with "\n": the first event waits for the next byte
        self.assertEqual(select.select([c.sock], [], [], 0.5)[0], [])
        self.fake.release.set()
        while not body.endswith(b"\r\n0\r\n\r\n"):
            body += c.sock.recv(65536)
        self.assertEqual(dechunk(body), self.expected(opts))

    def test_media_type_matched_in_any_case_with_parameters(self):
        for ctype in ("text/event-stream; charset=utf-8", "Text/Event-Stream",
                      "TEXT/EVENT-STREAM;charset=UTF-8"):
            with self.subTest(ctype=ctype):
                opts = dict(n=3, stream=True, sse="crlf", merge=5, ctype=ctype)
                r = self.conn().request("POST", self.path, opts)
                self.assertEqual(r.header("content-type"), ctype)
                self.assertEqual(r.chunks, self.expected(opts))

    def test_our_error_event_is_valid_whatever_line_ends_the_stream_used(self):
        for style in ("lf", "crlf", "cr", "mixed_ping"):
            with self.subTest(style=style):
                opts = dict(n=5, stream=True, sse=style, fail="reset", fail_after=2)
                r = self.conn().request("POST", self.path, opts)
                self.assertTrue(r.complete)
                events = parse_sse(r.body)
                self.assertEqual([e["data"] for e in events[:-1]],
                                 [e["data"] for e in parse_sse(b"".join(self.expected(opts)[:2]))])
                self.assertIn("message", json.loads(events[-1]["data"])["error"])


# ======================================================================== HTTP/1.1 client side

class ClientProtocolTest(GatewayCase):

    def test_keep_alive_and_pipelining_answer_in_order(self):
        c = self.conn()
        one = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
        gen = json.dumps({"n": 2}).encode()
        two = b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
            len(gen), gen)
        three = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n"
        c.send(one + two + three)
        self.assertEqual(c.response().json(), {"version": "0.12.6"})
        r = c.response()
        self.assertEqual(len(r.chunks), 3)
        self.assertEqual(c.response().json()["models"][0]["name"], "fake:latest")
        self.assertEqual(c.request("GET", "/api/version").status, 200)  # still open

    def test_connection_close_is_honoured(self):
        c = self.conn()
        r = c.request("GET", "/api/version", headers=[("Connection", "close")])
        self.assertEqual(r.header("connection"), "close")
        self.assertTrue(c.closed_by_peer())

    def test_http10_client_gets_close_delimited_body(self):
        c = self.conn()
        body = json.dumps({"n": 3}).encode()
        c.send(b"POST /api/generate HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        r = c.response()
        self.assertIsNone(r.header("transfer-encoding"))
        self.assertEqual(r.header("connection"), "close")
        self.assertEqual(len(r.body.split(b"\n")), 5)
        self.assertTrue(json.loads(r.body.split(b"\n")[3])["done"])
        c2 = self.conn()
        c2.send(b"GET /api/version HTTP/1.0\r\n\r\n")
        r = c2.response()
        self.assertEqual(r.header("content-length"), str(len(r.body)))

    def test_head_gets_headers_only(self):
        c = self.conn()
        r = c.request("HEAD", "/")
        self.assertEqual((r.status, r.header("content-length")), (200, "17"))
        self.assertEqual(c.request("GET", "/").body, b"Ollama is running")  # nothing left over

    def test_expect_100_continue(self):
        c = self.conn()
        body = json.dumps({"n": 1}).encode()
        c.send(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body))
        self.assertEqual(c.rfile.readline(), b"HTTP/1.1 100 Continue\r\n")
        self.assertEqual(c.rfile.readline(), b"\r\n")
        c.send(body)
        r = c.response()
        self.assertEqual((r.status, len(r.chunks)), (200, 2))
        self.assertNotIn("expect", self.fake.requests[-1]["hmap"])

    def test_chunked_request_body_is_forwarded_with_a_length(self):
        c = self.conn()
        c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n")
        seen = c.response().json()
        self.assertEqual(seen["body"], "hello, world")
        names = {k.lower(): v for k, v in seen["headers"]}
        self.assertEqual(names["content-length"], "12")
        self.assertNotIn("transfer-encoding", names)

    def test_delete_with_json_body(self):
        r = self.conn().request("DELETE", "/echo", {"model": "fake"})
        self.assertEqual(r.json()["method"], "DELETE")
        self.assertEqual(json.loads(r.json()["body"]), {"model": "fake"})

    def test_headers_forwarded_end_to_end_only_and_host_rewritten(self):
        c = self.conn()
        r = c.request("POST", "/echo?x=1&y=%20", b"{}", headers=[
            ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"), ("Upgrade", "h2c"), ("Proxy-Authorization", "x"),
            ("X-Custom", "kept"), ("User-Agent", "ollama-python/0.6")])
        seen = r.json()
        self.assertEqual(seen["target"], "/echo?x=1&y=%20")
        names = {k.lower(): v for k, v in seen["headers"]}
        self.assertEqual(names["host"], "127.0.0.1:%d" % self.fake.port)
        self.assertEqual(names["x-custom"], "kept")
        self.assertEqual(names["user-agent"], "ollama-python/0.6")
        for hop in ("connection", "x-hop", "keep-alive", "te", "upgrade", "proxy-authorization"):
            self.assertNotIn(hop, names)

    def test_each_request_has_a_connection_of_its_own_upstream(self):
        c = self.conn()  # one kept-alive client connection...
        before = self.fake.connections
        for _ in range(3):
            self.assertEqual(c.request("GET", "/api/version").status, 200)
            self.assertEqual(len(c.request("POST", "/api/generate", {"n": 2}).chunks), 3)
            self.assertEqual(c.request("GET", "/close-after").status, 200)  # upstream hangs up
        self.assertEqual(self.fake.connections, before + 9)  # ...nine upstream connections

    def test_upstream_errors_pass_through_unchanged(self):
        for status in (400, 404, 500, 503):
            r = self.conn().request("POST", "/api/chat", {"status": status, "error": "e%d" % status})
            self.assertEqual((r.status, r.json()), (status, {"error": "e%d" % status}))
        r = self.conn().request("GET", "/nope")
        self.assertEqual((r.status, r.body), (404, b"404 page not found"))

    def test_bad_requests_get_400_and_are_not_forwarded(self):
        before = len(self.fake.requests)
        for raw in (b"GARBAGE\r\n\r\n", b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n",
                    b"GET /x HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"):
            c = self.conn()
            c.send(raw)
            r = c.response()
            self.assertEqual(r.status, 400)
            self.assertIn("error", r.json())
            self.assertTrue(c.closed_by_peer())
        self.assertEqual(len(self.fake.requests), before)

    def test_huge_head_gets_431(self):
        c = self.conn()
        c.send(b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n")
        self.assertEqual(c.response().status, 431)

    def test_access_log_line(self):
        self.conn().request("GET", "/api/version?log=1")
        line = wait_for(lambda: [x for x in self.gw.log if "/api/version?log=1" in x])[0]
        self.assertRegex(line, r'^127\.0\.0\.1:\d+ "GET /api/version\?log=1" 200 \d+B '
                               r'ttfb=\d+\.\d+s \d+\.\d+s$')


# ======================================================================== the cap and its slots

class CapTest(GatewayCase):
    flags = ("--upstream-timeout", "1", "--client-timeout", "2")

    def hold(self, n, path="/api/generate"):
        """Open n streams that the fake holds after their first line."""
        held = []
        for _ in range(n):
            c = self.conn()
            c.request("POST", path, {"n": 3, "hold": True}, read=False)
            self.assertEqual(c.head()[0], 200)
            c.read_chunk()
            held.append(c)
        return held

    def test_eleventh_request_gets_503_and_is_not_forwarded(self):
        held = self.hold(10)
        self.assertEqual(self.gw.health()["active"], 10)  # health answers while all are busy
        before = self.fake.count("/api/generate")
        r = self.conn().request("POST", "/api/generate", {"n": 1})
        self.assertEqual((r.status, r.header("retry-after")), (503, "1"))
        self.assertEqual(r.header("content-type"), "application/json")
        self.assertIn("busy", r.json()["error"])
        r = self.conn().request("POST", "/v1/chat/completions", {"n": 1})
        self.assertEqual(r.status, 503)
        self.assertEqual(r.json()["error"]["type"], "api_error")
        self.assertIn("message", r.json()["error"])
        self.assertEqual(self.fake.count("/api/generate"), before)
        self.fake.release.set()
        for c in held:
            rest, complete = c.read_chunks()
            self.assertTrue(complete)
        self.gw.wait_idle()
        self.assertEqual(self.conn().request("POST", "/api/generate", {"n": 1}).status, 200)

    def test_listing_models_takes_no_generation_slot_but_is_bounded_too(self):
        held = self.hold(10)
        light = (("GET", "/api/tags", None), ("GET", "/api/ps", None), ("GET", "/api/version", None),
                 ("POST", "/api/show", {"model": "fake"}), ("GET", "/v1/models", None),
                 ("GET", "/v1/models/fake", None), ("GET", "/", None), ("HEAD", "/", None))
        for method, path, body in light:
            with self.subTest(path=path, method=method):
                before = self.fake.count(path)
                self.assertNotEqual(self.conn().request(method, path, body).status, 503)
                self.assertEqual(self.fake.count(path), before + 1)  # it reached Ollama
        for method, path in (("POST", "/api/unknown"), ("POST", "/api/tags"), ("GET", "/api/x")):
            with self.subTest(path=path, method=method):  # anything else takes a slot
                self.assertEqual(self.conn().request(method, path, {}).status, 503)
        shows = []
        for _ in range(10):  # ten light requests in flight besides the ten generations
            c = self.conn()
            c.request("POST", "/api/show", {"model": "fake", "hold": True}, read=False)
            shows.append(c)
        wait_for(lambda: self.gw.health()["light"] == 10, message="ten light in flight")
        self.assertEqual(self.gw.health()["active"], 10)
        before = self.fake.count("/api/tags")
        r = self.conn().request("GET", "/api/tags")
        self.assertEqual((r.status, r.header("retry-after")), (503, "1"))
        self.assertEqual(self.fake.count("/api/tags"), before)
        metrics = self.conn().request("GET", "/qlite/metrics").body.decode()
        self.assertIn("qlite_light_requests 10\n", metrics)
        self.assertIn("qlite_active_requests 10\n", metrics)
        self.fake.release.set()
        for c in held:
            self.assertTrue(c.read_chunks()[1])
        for c in shows:
            self.assertEqual(c.response("POST").status, 200)

    def test_every_ending_frees_its_slot_exactly_once(self):
        endings = []
        for i in range(3):
            c = self.conn()  # client leaves mid-stream
            c.request("POST", "/api/generate", {"n": 3, "hold": True}, read=False)
            c.head()
            endings.append(("leave", c))
            c = self.conn()  # client leaves before the head
            c.request("POST", "/api/generate", {"fail": "silent"}, read=False)
            endings.append(("leave", c))
            for fail in ("reset", "truncate", "badchunk", "reset_now", "close_now"):
                c = self.conn()
                c.request("POST", "/api/generate", {"n": 3, "fail": fail}, read=False)
                endings.append(("read", c))
            c = self.conn()  # the upstream times out (1 s)
            c.request("POST", "/api/generate", {"n": 3, "fail": "stall"}, read=False)
            endings.append(("read", c))
            c = self.conn()  # a normal one
            c.request("POST", "/api/generate", {"n": 2}, read=False)
            endings.append(("read", c))
        wait_for(lambda: self.fake.count("/api/generate") >= 27, message="all forwarded")
        for kind, c in endings:
            if kind == "leave":
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
            else:
                c.response("POST")
        self.gw.wait_idle()
        held = self.hold(10)
        r = self.conn().request("POST", "/api/generate", {"n": 1})
        self.assertEqual(r.status, 503)
        self.fake.release.set()
        for c in held:
            self.assertTrue(c.read_chunks()[1])


class CancellationTest(GatewayCase):

    def test_client_leaving_mid_stream_closes_upstream_at_once(self):
        before = self.fake.peer_closed
        c = self.conn()
        c.request("POST", "/api/generate", {"n": 3, "hold": True}, read=False)
        c.head()
        c.read_chunk()
        c.close()
        wait_for(lambda: self.fake.peer_closed > before, 1.0, "upstream closed within 1 s")
        self.gw.wait_idle()

    def test_client_reset_before_head_closes_upstream_at_once(self):
        before, forwarded = self.fake.peer_closed, self.fake.count("/api/generate")
        c = self.conn()
        c.request("POST", "/api/generate", {"fail": "silent"}, read=False)
        wait_for(lambda: self.fake.count("/api/generate") > forwarded, message="fake has it")
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        wait_for(lambda: self.fake.peer_closed > before, 1.0, "upstream closed within 1 s")
        self.gw.wait_idle()

    def test_client_leaving_a_delayed_stream_stops_generation(self):
        before = self.fake.peer_closed
        c = self.conn()
        c.request("POST", "/api/generate", {"n": 1000, "delay": 0.01}, read=False)
        c.head()
        c.read_chunk()
        c.close()
        wait_for(lambda: self.fake.peer_closed > before, 2.0, "generation stopped")


class BackpressureTest(GatewayCase):

    def rss_kib(self):
        return rss_kib(self.gw.proc.pid)

    def test_slow_reader_bounds_memory_and_gets_every_byte_in_order(self):
        n = 40000  # about 40 MB of NDJSON
        c = self.conn(timeout=60)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        c.request("POST", "/api/generate", {"n": n, "pad": 1000, "merge": 16}, read=False)
        base = self.rss_kib()
        last = [-1]

        def upstream_blocked():  # no progress in 0.2 s: backpressure reached the upstream
            seen, last[0] = last[0], self.fake.sent_bytes
            return seen == last[0] and not time.sleep(0.2)
        wait_for(upstream_blocked, message="upstream blocked by backpressure")
        self.assertLess(self.fake.sent_bytes, 20 * 1024 * 1024)
        others = self.conn().request("POST", "/api/generate", {"n": 5})  # others still served
        self.assertEqual(len(others.chunks), 6)
        grown = self.rss_kib() - base
        self.assertLess(grown, 8 * 1024, "gateway grew %d KiB while the client stalled" % grown)
        r = c.response("POST")
        self.assertTrue(r.complete, "".join(self.gw.log[-40:]) + " chunks %d" % len(r.chunks))
        self.assertEqual(len(r.chunks), n + 1)
        for i in (0, 1, n // 2, n - 1):
            self.assertEqual(json.loads(r.chunks[i])["response"], "tok%d%s" % (i, "x" * 1000))
        self.assertLess(self.rss_kib() - base, 16 * 1024)


# ======================================================================== upstream failures

class UpstreamFailureTest(GatewayCase):
    flags = ("--upstream-timeout", "0.6")

    def post(self, path, opts):
        return self.conn().request("POST", path, opts)

    def test_ndjson_failure_after_head_ends_with_error_line(self):
        for fail in ("reset", "truncate", "badchunk", "stall"):
            with self.subTest(fail=fail):
                r = self.post("/api/generate", {"n": 5, "fail": fail, "fail_after": 2})
                self.assertEqual(r.status, 200)
                self.assertTrue(r.complete, "the stream must end with a terminating chunk")
                self.assertEqual(len(r.chunks), 3)
                self.assertEqual(json.loads(r.chunks[0])["response"], "tok0")
                last = json.loads(r.chunks[-1])
                self.assertEqual(list(last), ["error"])
                self.assertTrue(r.chunks[-1].endswith(b"\n"))

    def test_sse_failure_ends_with_error_event(self):
        r = self.post("/v1/chat/completions", {"n": 5, "fail": "reset", "fail_after": 2})
        self.assertTrue(r.complete)
        self.assertEqual(len(r.chunks), 3)
        self.assertTrue(r.chunks[-1].startswith(b"data: ") and r.chunks[-1].endswith(b"\n\n"))
        self.assertIn("message", json.loads(r.chunks[-1][6:])["error"])

    def test_other_body_failure_is_cut_without_terminator(self):
        r = self.post("/raw", {"n": 5, "fail": "reset", "fail_after": 2})
        self.assertFalse(r.complete)
        self.assertEqual(r.body, b"raw text 0 \nraw text 1 \n")
        r = self.post("/api/generate", {"n": 5, "fail": "reset", "framing": "length"})
        self.assertFalse(r.complete)

    def test_interim_1xx_responses_are_dropped(self):
        for interim in ([103], [100], [102, 103]):
            with self.subTest(interim=interim):
                r = self.post("/api/generate", {"n": 2, "interim": interim})
                self.assertEqual((r.status, len(r.chunks)), (200, 3))
                self.assertIsNone(r.header("link"))

    def test_bad_framing_in_the_same_read_as_the_head(self):
        r = self.post("/api/generate", {"n": 2, "fail": "head_and_badchunk"})
        self.assertEqual(r.status, 200)
        self.assertTrue(r.complete)
        self.assertEqual(json.loads(r.chunks[0])["response"], "tok0")
        self.assertIn("chunk", json.loads(r.chunks[1])["error"])

    def test_no_head_in_time_gives_504(self):
        start = time.monotonic()
        r = self.post("/api/generate", {"fail": "silent"})
        self.assertEqual(r.status, 504)
        self.assertIn("error", r.json())
        self.assertLess(time.monotonic() - start, 3)

    def test_reset_or_close_before_head_gives_502(self):
        for fail in ("reset_now", "close_now"):
            r = self.post("/api/generate", {"fail": fail})
            self.assertEqual(r.status, 502)
            self.assertIn("error", r.json())
        r = self.post("/v1/chat/completions", {"fail": "reset_now"})
        self.assertEqual(r.json()["error"]["type"], "api_error")

    def test_silent_upstream_does_not_slow_anyone_else(self):
        stalled = self.conn()
        stalled.request("POST", "/api/generate", {"fail": "silent"}, read=False)
        start = time.monotonic()
        for _ in range(20):
            self.assertEqual(self.conn().request("GET", "/api/version").status, 200)
        self.assertLess(time.monotonic() - start, 0.5)


class RefusedUpstreamTest(unittest.TestCase):

    def test_connection_refused_gives_502_within_a_second(self):
        probe = socket.create_server(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        gw = GatewayProcess(port)
        try:
            start = time.monotonic()
            c = gw.conn()
            r = c.request("POST", "/api/chat", {"n": 1})
            c.close()
            self.assertEqual(r.status, 502)
            self.assertIn("upstream", r.json()["error"])
            self.assertLess(time.monotonic() - start, 1.0)
            self.assertEqual(gw.health()["active"], 0)
        finally:
            gw.stop()


# ======================================================================== client timeouts

class ClientTimeoutTest(GatewayCase):
    flags = ("--client-timeout", "0.5")

    def test_slow_request_gets_408_and_idle_connection_is_closed(self):
        c = self.conn()
        c.send(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
        start = time.monotonic()
        r = c.response()
        self.assertEqual(r.status, 408)
        self.assertLess(time.monotonic() - start, 2)
        self.assertTrue(c.closed_by_peer())
        idle = self.conn()
        self.assertEqual(idle.request("GET", "/api/version").status, 200)
        self.assertTrue(idle.closed_by_peer(3))  # closed silently, no 408 on an idle connection

    def test_client_that_stops_reading_is_cut_and_frees_its_slot(self):
        c = self.conn()
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.request("POST", "/api/generate", {"n": 100000, "pad": 200, "merge": 50}, read=False)
        wait_for(lambda: self.gw.health()["active"] == 1)
        wait_for(lambda: self.gw.health()["active"] == 0, message="stalled reader cut")


# ======================================================================== command line and signals

def run_qlite(*args, env=None):
    return subprocess.run([sys.executable, QLITE] + list(args), capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


class CommandLineTest(unittest.TestCase):

    def test_upstream_is_read_the_way_ollama_reads_ollama_host(self):
        parse = qlite.parse_upstream
        self.assertEqual(parse("example"), ("example", 11434))
        self.assertEqual(parse("example:1234"), ("example", 1234))
        self.assertEqual(parse("http://10.0.0.5:80"), ("10.0.0.5", 80))
        self.assertEqual(parse("http://[::1]:9/"), ("::1", 9))
        for bad in ("https://example", "http://example/path", "http://:80", "example:port"):
            self.assertRaises(ValueError, parse, bad)

    def test_mistakes_are_one_clear_line_and_nonzero_exit(self):
        for args, needle in ((["--max-active", "0"], "--max-active"),
                             (["--port", "70000"], "--port"),
                             (["--client-timeout", "soon"], "--client-timeout"),
                             (["--upstream", "https://example:1"], "http://host[:port]")):
            with self.subTest(args=args):
                p = run_qlite(*args)
                self.assertEqual(p.returncode, 2)
                self.assertIn(needle, p.stderr.strip().splitlines()[-1])
                self.assertNotIn("Traceback", p.stderr)

    def test_port_in_use_names_the_address(self):
        taken = socket.create_server(("127.0.0.1", 0))
        try:
            port = taken.getsockname()[1]
            p = run_qlite("--host", "127.0.0.1", "--port", str(port), "--upstream", "127.0.0.1:9")
            self.assertEqual(p.returncode, 1)
            self.assertEqual(len(p.stderr.strip().splitlines()), 1)
            self.assertIn("127.0.0.1:%d" % port, p.stderr)
            self.assertNotIn("Traceback", p.stderr)
        finally:
            taken.close()

    def test_ollama_host_from_environment_startup_line_and_quiet(self):
        fake = FakeOllama()
        env = dict(os.environ, OLLAMA_HOST="127.0.0.1:%d" % fake.port)
        gw = GatewayProcess(fake.port, "--quiet", "--max-active", "3", env=env)
        try:
            self.assertIn("upstream http://127.0.0.1:%d" % fake.port, gw.startup_line)
            self.assertIn("max 3 active", gw.startup_line)
            self.assertEqual(gw.get("/api/version").status, 200)
            self.assertEqual(gw.health()["max_active"], 3)
            self.assertEqual(gw.log, [gw.startup_line])  # --quiet: no access log
        finally:
            gw.stop()
            fake.stop()
        gw = GatewayProcess(1, env=env)  # no --upstream flag at all: $OLLAMA_HOST decides
        try:
            self.assertIn("upstream http://127.0.0.1:1", gw.startup_line)
        finally:
            gw.stop()


class SignalTest(unittest.TestCase):

    def setUp(self):
        self.fake = FakeOllama()
        self.gw = GatewayProcess(self.fake.port)

    def tearDown(self):
        self.gw.stop()
        self.fake.stop()

    def refused(self):
        try:
            socket.create_connection(("127.0.0.1", self.gw.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:  # queued as the listener closed: look again
            return False

    def held_stream(self):
        c = self.gw.conn()
        c.request("POST", "/api/generate", {"n": 3, "hold": True}, read=False)
        self.assertEqual(c.head()[0], 200)
        c.read_chunk()
        return c

    def test_sigterm_stops_listening_and_lets_requests_finish(self):
        c = self.held_stream()
        idle = self.gw.conn()
        self.assertEqual(idle.request("GET", "/api/version").status, 200)
        self.gw.proc.send_signal(signal.SIGTERM)
        wait_for(self.refused, 2, "listener closed")
        self.assertTrue(idle.closed_by_peer(2))  # idle keep-alive connections are closed
        self.assertIsNone(self.gw.proc.poll())
        self.fake.release.set()
        rest, complete = c.read_chunks()
        self.assertTrue(complete)
        self.assertEqual(len(rest), 3)
        self.assertEqual(self.gw.proc.wait(TIMEOUT), 0)
        c.close()
        idle.close()

    def test_second_signal_exits_now(self):
        c = self.held_stream()
        self.gw.proc.send_signal(signal.SIGINT)
        wait_for(lambda: self.refused(), 2, "first signal taken")
        self.gw.proc.send_signal(signal.SIGINT)
        self.assertNotEqual(self.gw.proc.wait(TIMEOUT), 0)
        c.close()


# ======================================================================== official clients

def installed(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


class OfficialClientTest(GatewayCase):
    """The clients people really use, when installed (pip install ollama openai); curl too."""

    @unittest.skipUnless(installed("ollama"), "the ollama package is not installed")
    def test_ollama_client_streams_and_raises_on_errors(self):
        import ollama
        client = ollama.Client(host="http://127.0.0.1:%d" % self.gw.port)
        self.addCleanup(client._client.close)
        parts = list(client.generate(model="fake", prompt="hi", stream=True, options={"n": 3}))
        self.assertEqual([p["response"] for p in parts][:3], ["tok0", "tok1", "tok2"])
        self.assertTrue(parts[-1]["done"])
        self.assertEqual(client.chat(model="fake", messages=[])["message"]["role"], "assistant")
        with self.assertRaises(ollama.ResponseError) as caught:
            list(client.chat(model="fake", messages=[], stream=True, options={"fail": "reset_now"}))
        self.assertEqual(caught.exception.status_code, 502)  # reset before the head
        self.assertEqual(client.list()["models"][0]["model"], "fake:latest")

    @unittest.skipUnless(installed("ollama"), "the ollama package is not installed")
    def test_ollama_client_raises_instead_of_returning_a_short_answer(self):
        import ollama
        client = ollama.Client(host="http://127.0.0.1:%d" % self.gw.port)
        self.addCleanup(client._client.close)
        got = []
        with self.assertRaises(ollama.ResponseError) as caught:
            for part in client.generate(model="fake", prompt="hi", stream=True,
                                        options={"n": 5, "fail": "reset", "fail_after": 2}):
                got.append(part["response"])
        self.assertEqual(got, ["tok0", "tok1"])
        self.assertIn("upstream", str(caught.exception))

    @unittest.skipUnless(installed("openai"), "the openai package is not installed")
    def test_openai_client_streams_and_sees_503(self):
        import openai
        client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.gw.port, api_key="x",
                               max_retries=0)
        chunks = list(client.chat.completions.create(model="fake", messages=[], stream=True,
                                                     extra_body={"n": 4, "split": 5}))
        self.assertEqual([c.choices[0].delta.content for c in chunks][:4],
                         ["tok0", "tok1", "tok2", "tok3"])
        with self.assertRaises(openai.APIError):
            list(client.chat.completions.create(model="fake", messages=[], stream=True,
                                                extra_body={"n": 4, "fail": "reset"}))
        with self.assertRaises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="fake", messages=[],
                                           extra_body={"status": 503})
        self.assertEqual(caught.exception.status_code, 503)

    @unittest.skipUnless(installed("openai"), "the openai package is not installed")
    def test_openai_client_retries_a_busy_gateway_by_itself(self):
        import openai
        held = []
        for _ in range(10):
            c = self.conn()
            c.request("POST", "/api/generate", {"n": 3, "hold": True}, read=False)
            c.head()
            held.append(c)
        client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.gw.port, api_key="x",
                               max_retries=2)
        def release_after_503():  # free the slots once the gateway has turned the client away
            wait_for(lambda: any(" 503 " in line for line in self.gw.log))
            self.fake.release.set()
        threading.Thread(target=release_after_503, daemon=True).start()
        reply = client.chat.completions.create(model="fake", messages=[],
                                               extra_body={"stream": False})
        self.assertEqual(reply.choices[0].message.content, "tok0")

    @unittest.skipUnless(subprocess.run(["which", "curl"], capture_output=True).returncode == 0,
                         "curl is not installed")
    def test_curl_streams_and_does_not_wait_for_100_continue(self):
        body = json.dumps({"n": 3, "pad": 2000})  # over 1 KiB: curl sends Expect: 100-continue
        start = time.monotonic()
        p = subprocess.run(["curl", "-sS", "--no-buffer", "-d", body,
                            "http://127.0.0.1:%d/api/generate" % self.gw.port],
                           capture_output=True, timeout=TIMEOUT)
        self.assertLess(time.monotonic() - start, 0.9)
        lines = p.stdout.decode().splitlines()
        self.assertEqual(len(lines), 4)
        self.assertTrue(json.loads(lines[-1])["done"])


# ======================================================================== exposure: key and admin lock

KEY = "s3cret-key"


def raw_exchange(port, data, timeout=TIMEOUT):
    """Send raw bytes, half-close, and return everything the gateway sends until it closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        sock.close()


class ApiKeyTest(GatewayCase):
    flags = ("--api-key", KEY)

    def test_missing_or_wrong_key_gets_401_and_nothing_is_forwarded(self):
        before = len(self.fake.requests)
        for headers in ([], [("Authorization", "Bearer wrong")], [("Authorization", KEY)],
                        [("Authorization", "Basic " + KEY)]):
            r = self.conn().request("POST", "/api/generate", {"n": 1}, headers=headers)
            self.assertEqual((r.status, r.header("www-authenticate")), (401, "Bearer"))
            self.assertIn("API key", r.json()["error"])
        r = self.conn().request("GET", "/v1/models")
        self.assertEqual(r.json()["error"]["type"], "authentication_error")
        self.assertEqual(self.conn().request("GET", "/qlite/metrics").status, 401)
        self.assertEqual(len(self.fake.requests), before)

    def test_scheme_name_in_any_case_and_the_key_exact(self):
        for scheme in ("bearer", "BEARER", "BeArEr"):
            r = self.conn().request("POST", "/echo", b"{}", headers=[
                ("Authorization", "%s %s" % (scheme, KEY))])
            self.assertEqual(r.status, 200, scheme)
        for value in ("Bearer " + KEY.upper(), "Bearer " + KEY + "x", "Bearer", "bearer  "):
            r = self.conn().request("POST", "/echo", b"{}", headers=[("Authorization", value)])
            self.assertEqual(r.status, 401, value)

    def test_right_key_passes_and_is_never_sent_upstream(self):
        r = self.conn().request("POST", "/echo", b"{}", headers=[("Authorization", "Bearer " + KEY)])
        self.assertEqual(r.status, 200)
        self.assertNotIn("authorization", {k.lower() for k, v in r.json()["headers"]})
        self.assertEqual(self.conn().request("GET", "/qlite/metrics", headers=[
            ("Authorization", "Bearer " + KEY)]).status, 200)

    def test_health_and_cors_preflight_need_no_key(self):
        self.assertEqual(self.conn().request("GET", "/qlite/health").status, 200)
        before = self.fake.count("/api/chat")
        r = self.conn().request("OPTIONS", "/api/chat", headers=[
            ("Origin", "http://app.example"), ("Access-Control-Request-Method", "POST")])
        self.assertNotEqual(r.status, 401)  # Ollama (here the fake) decides what browsers may do
        self.assertEqual(self.fake.count("/api/chat"), before + 1)
        self.assertEqual(self.conn().request("OPTIONS", "/api/chat").status, 401)

    @unittest.skipUnless(installed("ollama"), "the ollama package is not installed")
    def test_ollama_client_with_key(self):
        import ollama
        url = "http://127.0.0.1:%d" % self.gw.port
        client = ollama.Client(host=url, headers={"Authorization": "Bearer " + KEY})
        self.addCleanup(client._client.close)
        parts = list(client.generate(model="fake", prompt="hi", stream=True))
        self.assertTrue(parts[-1]["done"])
        anonymous = ollama.Client(host=url)
        self.addCleanup(anonymous._client.close)
        with self.assertRaises(ollama.ResponseError) as caught:
            anonymous.generate(model="fake", prompt="hi")
        self.assertEqual(caught.exception.status_code, 401)

    @unittest.skipUnless(installed("openai"), "the openai package is not installed")
    def test_openai_client_with_key(self):
        import openai
        url = "http://127.0.0.1:%d/v1" % self.gw.port
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        chunks = list(client.chat.completions.create(model="fake", messages=[], stream=True))
        self.assertEqual(chunks[0].choices[0].delta.content, "tok0")
        with self.assertRaises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).chat.completions.create(
                model="fake", messages=[])


class AdminLockTest(GatewayCase):

    def test_model_management_is_locked_by_default(self):
        before = len(self.fake.requests)
        for method, path in (("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
                             ("POST", "/api/copy"), ("DELETE", "/api/delete"),
                             ("POST", "/api/blobs/sha256:abc"), ("HEAD", "/api/blobs/sha256:abc"),
                             ("POST", "/api/%70ull"), ("POST", "/api//pull"),
                             ("POST", "/api/pull/"), ("POST", "/x/../api/delete")):
            with self.subTest(path=path):
                r = self.conn().request(method, path, {"model": "fake"})
                self.assertEqual(r.status, 403)
                if method != "HEAD":
                    self.assertIn("--allow-admin", r.json()["error"])
        self.assertEqual(len(self.fake.requests), before)
        self.assertEqual(self.conn().request("POST", "/api/generate", {"n": 1}).status, 200)

    def test_startup_line_warns_when_exposed_without_key(self):
        self.assertNotIn("no --api-key", self.gw.startup_line)  # 127.0.0.1 is not exposed
        p = subprocess.Popen([sys.executable, QLITE, "--host", "0.0.0.0", "--port", "0",
                              "--upstream", "127.0.0.1:9"], stderr=subprocess.PIPE, text=True)
        try:
            self.assertIn("no --api-key", p.stderr.readline())
        finally:
            p.kill()
            p.wait()
            p.stderr.close()


class AdminAllowedTest(GatewayCase):
    flags = ("--allow-admin", "--api-key", KEY)

    def test_allow_admin_opens_model_management_behind_the_key(self):
        auth = [("Authorization", "Bearer " + KEY)]
        self.assertEqual(self.conn().request("POST", "/api/pull", {"n": 2}).status, 401)
        r = self.conn().request("POST", "/api/pull", {"n": 2}, headers=auth)
        self.assertEqual((r.status, len(r.chunks)), (200, 2))
        r = self.conn().request("DELETE", "/api/delete", {"model": "fake"}, headers=auth)
        self.assertEqual(r.status, 200)


# ======================================================================== hostile input

class HostileInputTest(GatewayCase):
    flags = ("--max-body", "4096", "--client-timeout", "1")

    def assert_refused(self, raw, status):
        before = len(self.fake.requests)
        reply = raw_exchange(self.gw.port, raw)
        self.assertTrue(reply.startswith(b"HTTP/1.1 %d " % status), (raw[:80], reply[:120]))
        head, _, body = reply.partition(b"\r\n\r\n")
        self.assertIn(b"Connection: close", head)
        self.assertIn("error", json.loads(body))
        self.assertEqual(len(self.fake.requests), before, "forwarded: %r" % raw[:80])

    def test_request_smuggling_is_refused(self):
        post = b"POST /api/generate HTTP/1.1\r\nHost: x\r\n"
        for extra, status in (
                (b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", 400),
                (b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}", 400),
                (b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
                (b"Content-Length: -1\r\n\r\n{}", 400),
                (b"Content-Length: +2\r\n\r\n{}", 400),
                (b"Content-Length: 1e3\r\n\r\n{}", 400),
                (b"Content-Length: 0x2\r\n\r\n{}", 400),
                (b"Content-Length: 2, 2\r\n\r\n{}", 400),
                (b"Content-Length: \xb2\r\n\r\n{}", 400),
                (b"Transfer-Encoding: gzip\r\n\r\n{}", 501),
                (b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 501),
                (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
                (b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),
                (b"Transfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n", 400),
                (b"Transfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n", 400),
                (b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}xx\r\n0\r\n\r\n", 400),
                (b"Transfer-Encoding: chunked\r\n\r\n1111111111111111\r\n", 400),
                (b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 2000, 400)):
            with self.subTest(extra=extra[:60]):
                self.assert_refused(post + extra, status)

    def test_malformed_heads_are_refused(self):
        for raw, status in (
                (b"GET /\r\n\r\n", 400),
                (b"GET  / HTTP/1.1\r\n\r\n", 400),
                (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
                (b"GET / HTTP/2.0\r\n\r\n", 505),
                (b"GET / HTTP/0.9\r\n\r\n", 505),
                (b"GET / HTTX/1.1\r\n\r\n", 400),
                (b"G@T / HTTP/1.1\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nHost\t: x\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nHost: x\r\n  folded\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nX-A: a\x01b\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nX\x00A: ab\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n", 400),
                (b"GET api/tags HTTP/1.1\r\n\r\n", 400),
                (b"GET * HTTP/1.1\r\n\r\n", 400),
                (b"GET /a\x7fb HTTP/1.1\r\n\r\n", 400),
                (b"GET /a\tb HTTP/1.1\r\n\r\n", 400),
                (b"GET /\xe2\x82\xac HTTP/1.1\r\n\r\n", 400),
                (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", 405)):
            with self.subTest(raw=raw[:40]):
                self.assert_refused(raw, status)

    def test_absolute_form_with_broken_brackets_or_control_characters_is_400(self):
        for target in (b"http://[::1/api/tags", b"http://x/api/ta\tgs", b"http://x/api/\x01tags",
                       b"http://x]/api/tags"):
            with self.subTest(target=target):
                self.assert_refused(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target, 400)

    def test_http11_needs_exactly_one_host(self):
        self.assert_refused(b"GET /api/tags HTTP/1.1\r\n\r\n", 400)
        self.assert_refused(b"GET /api/tags HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)
        reply = raw_exchange(self.gw.port, b"GET /api/tags HTTP/1.0\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "))

    def test_empty_lines_before_a_request_line_are_ignored(self):
        body = json.dumps({"n": 1}).encode()
        c = self.conn()
        c.send(b"\r\n\n\r\nPOST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
               b"\r\nGET /api/version HTTP/1.1\r\nHost: x\r\n\r\n" % (len(body), body))
        self.assertEqual(len(c.response("POST").chunks), 2)
        self.assertEqual(c.response().json(), {"version": "0.12.6"})

    def test_chunk_size_with_leading_zeros_however_long(self):
        c = self.conn()
        c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"0" * 3000 + b"5\r\nhello\r\n" + b"0" * 2000 + b"\r\n\r\n")
        self.assertEqual(c.response().json()["body"], "hello")

    def test_a_head_typed_with_bare_lf_is_answered_at_once(self):
        c = self.conn()
        c.send(b"GET /api/version HTTP/1.1\nHost: x\n\n")  # a hang would end in 408
        self.assertEqual((c.response().status), 200)
        c.send(b"GARBAGE\n\n")
        self.assertEqual((c.response().status), 400)

    def test_header_names_with_underscores_are_not_forwarded(self):
        r = self.conn().request("POST", "/echo", b"{}", headers=[
            ("Content_Length", "99"), ("Transfer_Encoding", "chunked"), ("X_User", "admin"),
            ("X-Kept", "1")])
        names = {k.lower() for k, v in r.json()["headers"]}
        self.assertEqual(r.json()["body"], "{}")
        self.assertIn("x-kept", names)
        for name in ("content_length", "transfer_encoding", "x_user"):
            self.assertNotIn(name, names)

    def test_absolute_form_is_served_from_the_upstream_only(self):
        r = self.conn().request("GET", "http://evil.example:9/echo?a=1")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json()["target"], "/echo?a=1")
        names = {k.lower(): v for k, v in r.json()["headers"]}
        self.assertEqual(names["host"], "127.0.0.1:%d" % self.fake.port)

    def test_size_limits(self):
        self.assert_refused(b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431)
        self.assert_refused(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431)
        self.assert_refused(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414)
        self.assertEqual(self.conn().request("GET", "/api/tags", headers=[("X-A", "b")] * 99).status,
                         200)
        # 413 comes as soon as the length is known, before any of the body is sent
        c = self.conn()
        c.send(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        r = c.response()
        self.assertEqual(r.status, 413)
        c = self.conn()
        c.send(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + (b"800\r\n" + b"x" * 2048 + b"\r\n") * 3)
        self.assertEqual(c.response().status, 413)
        body = json.dumps({"n": 1, "pad": 3000}).encode()
        self.assertEqual(self.conn().request("POST", "/api/generate", body).status, 200)

    def test_errors_never_disturb_other_clients(self):
        stream = self.conn()
        stream.request("POST", "/api/generate", {"n": 3, "hold": True}, read=False)
        stream.head()
        stream.read_chunk()
        for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", b"\x16\x03\x01\x02"):
            raw_exchange(self.gw.port, raw)
        self.assertEqual(self.gw.health()["active"], 1)
        self.fake.release.set()
        self.assertTrue(stream.read_chunks()[1])

    def test_a_hundred_slow_clients_leave_everyone_else_served(self):
        slow = [self.conn() for _ in range(100)]
        stop = threading.Event()

        def dribble():  # one byte of a request head per client every 50 ms
            head = b"POST /api/generate HTTP/1.1\r\nHost: x\r\n"
            for i in range(len(head)):
                if stop.is_set():
                    return
                for c in slow:
                    try:
                        c.send(head[i:i + 1])
                    except OSError:
                        pass
                stop.wait(0.05)
        threading.Thread(target=dribble, daemon=True).start()
        try:
            worst = 0.0
            for _ in range(20):
                start = time.monotonic()
                r = self.conn().request("POST", "/api/generate", {"n": 2})
                worst = max(worst, time.monotonic() - start)
                self.assertEqual(r.status, 200)
            self.assertLess(worst, 0.5)
            for c in slow:  # each is cut at --client-timeout with a 408
                self.assertEqual(c.response().status, 408)
        finally:
            stop.set()

    def test_a_thousand_idle_connections(self):
        idle = []
        try:
            for _ in range(1000):
                idle.append(socket.create_connection(("127.0.0.1", self.gw.port), timeout=TIMEOUT))
            r = self.conn().request("POST", "/api/generate", {"n": 2})
            self.assertEqual((r.status, len(r.chunks)), (200, 3))
        finally:
            for s in idle:
                s.close()


class FloodTest(GatewayCase):
    flags = ("--client-timeout", "2")

    def test_a_client_that_pipelines_and_never_reads_costs_about_the_high_water_mark(self):
        base, peak = rss_kib(self.gw.proc.pid), [0]
        flood = subprocess.Popen([sys.executable, "-c", FLOOD % self.gw.port],
                                 stdout=subprocess.PIPE, text=True)  # its own process and GIL
        self.addCleanup(flood.wait)
        self.addCleanup(flood.kill)
        self.assertEqual(flood.stdout.readline(), "flooding\n")
        r = self.conn().request("POST", "/api/generate", {"n": 5})  # others are still served
        self.assertEqual(len(r.chunks), 6)

        def cut_off():
            peak[0] = max(peak[0], rss_kib(self.gw.proc.pid))
            return flood.poll() is not None
        wait_for(cut_off, timeout=30, message="the flood cut after --client-timeout stalled")
        sent = int(flood.stdout.read().split()[1])
        flood.stdout.close()
        self.assertGreater(sent, 1 << 20)
        self.assertLess(peak[0] - base, 4 * 1024, "grew %d KiB" % (peak[0] - base))


FLOOD = """
import socket
s = socket.create_connection(("127.0.0.1", %d))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
sent, said = 0, False
try:
    while True:  # pipelined requests, never a byte read
        sent += s.send(b"GET /qlite/health HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" * 500)
        if sent > 1 << 20 and not said:
            print("flooding", flush=True)
            said = True
except OSError:
    print("cut", sent, flush=True)
"""


class DescriptorExhaustionTest(unittest.TestCase):

    def test_a_request_with_no_descriptor_left_gets_503_and_the_gateway_lives_on(self):
        import resource
        fake = FakeOllama()
        self.addCleanup(fake.stop)
        proc = subprocess.Popen(
            [sys.executable, QLITE, "--host", "127.0.0.1", "--port", "0", "--upstream",
             "127.0.0.1:%d" % fake.port], stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40)))
        idle = []
        try:
            port = int(re.search(r":(\d+),", proc.stderr.readline()).group(1))
            early = Conn(port)  # accepted before descriptors run out
            self.addCleanup(early.close)
            self.assertEqual(early.request("GET", "/qlite/health").status, 200)
            for _ in range(60):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
            wait_for(lambda: len(os.listdir("/proc/%d/fd" % proc.pid)) >= 40,
                     message="gateway out of descriptors")
            before = fake.count("/api/generate")
            r = early.request("POST", "/api/generate", {"n": 2})
            self.assertEqual((r.status, r.header("retry-after")), (503, "1"))
            self.assertIn("upstream", r.json()["error"])
            self.assertEqual(fake.count("/api/generate"), before)
            for s in idle:
                s.close()

            def streams():
                c = Conn(port)
                try:
                    r = c.request("POST", "/api/generate", {"n": 2})
                    return r.status == 200 and len(r.chunks) == 3
                except OSError:
                    return False
                finally:
                    c.close()
            wait_for(streams, message="a normal stream once descriptors are back")
            c = Conn(port)
            self.addCleanup(c.close)
            health = c.request("GET", "/qlite/health").json()
            self.assertEqual((health["active"], health["light"]), (0, 0))
            self.assertIsNone(proc.poll())
        finally:
            for s in idle:
                s.close()
            proc.kill()
            proc.wait()
            log = proc.stderr.read()
            proc.stderr.close()
        self.assertNotIn("Traceback", log)

    def test_running_out_of_descriptors_neither_spins_nor_crashes(self):
        import resource
        fake = FakeOllama()
        env = dict(os.environ)
        cmd = [sys.executable, QLITE, "--host", "127.0.0.1", "--port", "0",
               "--upstream", "127.0.0.1:%d" % fake.port]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=lambda: resource.setrlimit(
                                    resource.RLIMIT_NOFILE, (40, 40)))
        conns = []
        try:
            port = int(re.search(r":(\d+),", proc.stderr.readline()).group(1))
            for _ in range(60):  # more than the gateway can hold
                conns.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))

            def cpu_seconds():
                with open("/proc/%d/stat" % proc.pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            before, start = cpu_seconds(), time.monotonic()
            wait_for(lambda: time.monotonic() - start > 1.0)
            self.assertLess(cpu_seconds() - before, 0.3, "the loop spins when out of descriptors")
            for c in conns:
                c.close()
            conns = []

            def served():
                c = Conn(port)
                try:
                    return c.request("GET", "/api/version").status == 200
                except OSError:
                    return False
                finally:
                    c.close()
            wait_for(served, message="served again once descriptors are free")
            self.assertIsNone(proc.poll())
        finally:
            for c in conns:
                c.close()
            proc.kill()
            proc.wait()
            proc.stderr.close()
            fake.stop()


class FuzzTest(GatewayCase):
    flags = ("--client-timeout", "1", "--max-body", "100000")

    def mutate(self, rng, data):
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(6)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif op == 1:
                data[pos:pos] = rng.choice([b"\r\n", b"\n", b" ", b":", b"\x00", b"\t",
                                            b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
                                            b"0\r\n\r\n", b"ffffffff\r\n", bytes([rng.randrange(256)])])
            elif op == 2:
                del data[pos:pos + rng.randint(1, 20)]
            elif op == 3:
                data = data[:pos]
            elif op == 4:
                data[pos:pos] = data[:rng.randint(1, 60)]
            else:
                data = data.replace(b"HTTP/1.1", rng.choice([b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1.1 "]))
        return bytes(data)

    def test_random_mutations_of_valid_requests(self):
        import random
        seed = int(os.environ.get("QLITE_FUZZ_SEED", "1234"))
        rng = random.Random(seed)
        body = json.dumps({"n": 2}).encode()
        valid = [
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (len(body), body),
            b"GET /api/version HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
            b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            b"GET /qlite/health HTTP/1.0\r\n\r\n"]
        cases = [self.mutate(rng, rng.choice(valid)) for _ in range(300)]
        for start in range(0, len(cases), 30):  # 30 at a time, each on its own connection
            threads = [threading.Thread(target=raw_exchange, args=(self.gw.port, case, 5))
                       for case in cases[start:start + 30]]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
            self.assertIsNone(self.gw.proc.poll(), "gateway died (seed %d)" % seed)
        self.gw.wait_idle()
        self.assertNotIn("Traceback", "".join(self.gw.log),
                         "a traceback in the gateway log (seed %d)" % seed)
        r = self.conn().request("POST", "/api/generate", {"n": 3})
        self.assertEqual(len(r.chunks), 4)


# ======================================================================== health and metrics

class MetricsTest(GatewayCase):
    flags = ("--max-active", "1")

    def test_499_only_before_the_head_and_streams_left_early_counted(self):
        def counted():
            text = self.conn().request("GET", "/qlite/metrics").body.decode()
            return int(re.search(r"qlite_streams_left_early_total (\d+)", text).group(1))
        before = counted()
        c = self.conn()  # hangs up after data: [DONE], before the last chunk
        c.request("POST", "/v1/chat/completions", {"n": 2, "stream": True, "hold_end": True},
                  read=False)
        c.head()
        while c.read_chunk() != b"data: [DONE]\n\n":
            pass
        c.close()
        line = wait_for(lambda: [x for x in self.gw.log if '"POST /v1/chat/completions"' in x])
        self.assertRegex(line[0], r'" 200 \d+B ttfb=')
        self.assertEqual(counted(), before + 1)
        c = self.conn()  # hangs up before the response head
        c.request("POST", "/api/generate", {"fail": "silent"}, read=False)
        wait_for(lambda: self.gw.health()["active"] == 1, message="forwarded")
        c.close()
        wait_for(lambda: [x for x in self.gw.log if '"POST /api/generate" 499 ' in x])
        self.assertEqual(counted(), before + 1)

    def test_health(self):
        h = self.gw.health()
        self.assertEqual(h, {"status": "ok", "active": 0, "light": 0, "max_active": 1,
                             "error": None, "upstream": "http://127.0.0.1:%d" % self.fake.port})
        self.assertEqual(self.conn().request("POST", "/qlite/health", b"").status, 405)
        self.assertEqual(self.conn().request("GET", "/qlite/nothing").status, 404)

    def test_metrics_are_exact(self):
        gw = GatewayProcess(self.fake.port, "--max-active", "1", "--quiet")  # counters from zero
        self.addCleanup(gw.stop)
        received = []

        def post(path, opts, send_only=False):
            body = json.dumps(opts).encode()
            raw = b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (
                path.encode(), len(body), body)
            if send_only:
                sock = socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT)
                sock.sendall(raw)
                return sock
            received.append(raw_exchange(gw.port, raw))
            return received[-1]
        post("/api/generate", {"n": 3})
        post("/api/chat", {"n": 5})
        post("/api/generate", {"n": 3, "fail": "reset", "fail_after": 1})
        post("/api/generate", {"status": 404})
        held = post("/api/generate", {"n": 2, "hold": True}, send_only=True)
        got = b""
        while b"tok0" not in got:  # holds the only slot while the next request is turned away
            got += held.recv(65536)
        self.assertTrue(post("/api/generate", {"n": 1}).startswith(b"HTTP/1.1 503 "))
        self.fake.release.set()
        while True:
            data = held.recv(65536)
            if not data:
                break
            got += data
        held.close()
        received.append(got)
        # the slot was freed before the gateway closed that connection: no wait needed
        c = gw.conn()
        text = c.request("GET", "/qlite/metrics").body.decode()
        c.close()
        metrics = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
        self.assertEqual(metrics["qlite_active_requests"], "0")
        self.assertEqual(metrics["qlite_max_active_requests"], "1")
        self.assertEqual(metrics['qlite_requests_total{code="200"}'], "4")
        self.assertEqual(metrics['qlite_requests_total{code="404"}'], "1")
        self.assertEqual(metrics['qlite_requests_total{code="503"}'], "1")
        self.assertEqual(metrics["qlite_rejected_total"], "1")
        self.assertEqual(metrics["qlite_upstream_errors_total"], "1")
        self.assertEqual(metrics["qlite_generated_tokens_total"], "10")  # 3 + 5 + 2
        self.assertAlmostEqual(float(metrics["qlite_generation_seconds_total"]), 0.2)
        self.assertEqual(metrics["qlite_time_to_first_byte_seconds_count"], "5")
        self.assertEqual(metrics['qlite_time_to_first_byte_seconds_bucket{le="+Inf"}'], "5")
        self.assertEqual(metrics['qlite_time_to_first_byte_seconds_bucket{le="60.0"}'], "5")
        self.assertEqual(int(metrics["qlite_response_bytes_total"]), len(b"".join(received)))
        self.assertIn("# TYPE qlite_time_to_first_byte_seconds histogram", text)


class UpstreamHealthTest(unittest.TestCase):
    """Health follows Ollama itself, at about one probe a second however often it is asked."""

    def test_health_follows_ollama_down_and_up_without_other_traffic(self):
        port = free_port()
        gw = GatewayProcess(port)  # nothing listens there yet
        self.addCleanup(gw.stop)

        def health(status):
            r = gw.get("/qlite/health")
            return r.json() if r.status == status else None
        body = wait_for(lambda: health(503), message="health 503 while Ollama is down")
        self.assertEqual(body["status"], "down")
        self.assertIn("refused", body["error"].lower())
        self.assertIn("qlite_upstream_up 0\n", gw.get("/qlite/metrics").body.decode())
        fake = FakeOllama(port)
        self.addCleanup(fake.stop)
        start = time.monotonic()
        self.assertEqual(wait_for(lambda: health(200))["status"], "ok")
        self.assertLess(time.monotonic() - start, 3.0)
        before, start = fake.connections, time.monotonic()
        asked = 0
        while time.monotonic() - start < 2.0:  # ask as fast as we can for two seconds
            asked += bool(health(200))
        probes = fake.connections - before
        self.assertGreater(asked, 50)
        self.assertLessEqual(probes, (time.monotonic() - start) / qlite.PROBE_EVERY + 2)
        fake.stop()
        start = time.monotonic()
        wait_for(lambda: health(503), message="health 503 once Ollama stopped")
        self.assertLess(time.monotonic() - start, 3.0)


# ======================================================================== scale out behind nginx

def find_nginx():
    for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(path, os.X_OK):
            return path
    from shutil import which
    return which("nginx")


def free_port():
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


NGINX_PROLOGUE = """
worker_processes 1;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path %(dir)s/body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
"""  # a private nginx in a temporary folder: the part every configuration here shares

NGINX_CONF = NGINX_PROLOGUE + """

    # The recipe of README.md, "Scale out with nginx".
    upstream qlite {
        server 127.0.0.1:%(a)d max_fails=0;
        server 127.0.0.1:%(b)d max_fails=0;
        keepalive 16;
    }
    server {
        listen 127.0.0.1:%(port)d;
        location / {
            proxy_pass http://qlite;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
        }
    }
}
"""


@unittest.skipUnless(find_nginx(), "nginx is not installed (apt-get install nginx-light)")
class ScaleOutTest(unittest.TestCase):

    def setUp(self):
        import tempfile
        self.fakes = [FakeOllama(), FakeOllama()]
        self.gws = [GatewayProcess(f.port, "--max-active", "2") for f in self.fakes]
        self.dir = tempfile.mkdtemp(prefix="qlite-nginx-")
        os.chmod(self.dir, 0o777)
        self.port = free_port()
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF % {"dir": self.dir, "a": self.gws[0].port, "b": self.gws[1].port,
                                  "port": self.port})
        self.nginx = subprocess.Popen([find_nginx(), "-p", self.dir, "-c", conf, "-g",
                                       "daemon off;"], stderr=subprocess.PIPE)
        wait_for(self.nginx_up, message="nginx accepting")
        self.conns = []

    def nginx_up(self):
        self.assertIsNone(self.nginx.poll(), self.nginx.stderr.read() if self.nginx.poll() else "")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def tearDown(self):
        for f in self.fakes:
            f.release.set()
        for c in self.conns:
            c.close()
        self.nginx.terminate()
        self.nginx.wait(TIMEOUT)
        self.nginx.stderr.close()
        for g in self.gws:
            g.stop()
        for f in self.fakes:
            f.stop()
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)

    def conn(self):
        c = Conn(self.port)
        self.conns.append(c)
        return c

    def test_busy_nodes_pass_requests_on_and_the_fifth_gets_503(self):
        for _ in range(4):
            c = self.conn()
            c.request("POST", "/api/generate", {"n": 3, "hold": True}, read=False)
            self.assertEqual(c.head()[0], 200)
            self.assertEqual(json.loads(c.read_chunk())["response"], "tok0")
        self.assertEqual([g.health()["active"] for g in self.gws], [2, 2])
        self.assertEqual([f.count("/api/generate") for f in self.fakes], [2, 2])
        r = self.conn().request("POST", "/api/generate", {"n": 1})
        self.assertEqual(r.status, 503)
        self.assertIn("busy", r.json()["error"])
        self.assertEqual([f.count("/api/generate") for f in self.fakes], [2, 2])  # never forwarded
        for f in self.fakes:
            f.release.set()
        for c in self.conns[:4]:  # lines released together may share an nginx chunk: count lines
            rest, complete = c.read_chunks()
            self.assertTrue(complete)
            self.assertEqual(b"".join(rest).count(b"\n"), 3)

    def test_a_node_whose_ollama_is_down_passes_requests_on(self):
        self.fakes[0].stop()
        for _ in range(4):
            r = self.conn().request("POST", "/api/generate", {"n": 2})
            self.assertEqual((r.status, r.body.count(b"\n")), (200, 3))  # nginx may merge lines
        self.assertEqual(self.fakes[1].count("/api/generate"), 4)
        self.assertTrue([x for x in self.gws[0].log if '"POST /api/generate" 502 ' in x])

    def test_streaming_through_the_chain_is_one_line_per_chunk_as_produced(self):
        c = self.conn()
        c.request("POST", "/api/chat", {"n": 3, "hold": True}, read=False)
        status, _, headers = c.head()
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("transfer-encoding"), "chunked")
        first = c.read_chunk()  # arrives while the upstream still holds the rest: nothing buffers
        self.assertEqual(json.loads(first)["message"]["content"], "tok0")
        for f in self.fakes:
            f.release.set()
        rest, complete = c.read_chunks()
        self.assertTrue(complete)
        r = self.conn().request("POST", "/api/generate", {"n": 6, "delay": 0.02, "merge": 1})
        self.assertEqual(len(r.chunks), 7)
        for chunk in r.chunks:
            self.assertEqual(chunk.count(b"\n"), 1)
            json.loads(chunk)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fake-ollama"]:  # the benchmark runs the fake in its own process
        fake = FakeOllama(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
        print("fake ollama on %d" % fake.port, flush=True)
        try:
            signal.sigwait([signal.SIGTERM, signal.SIGINT])
        finally:
            fake.stop()
    else:
        unittest.main()

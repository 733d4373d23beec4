"""Tests for qlite.py: real sockets on 127.0.0.1, a fake Ollama, assertions on bytes.

The fake Ollama below speaks HTTP/1.1 the way Ollama does (see ollama-wire.md): NDJSON streams
with one line per chunk, `Date` and `Content-Type` only, JSON errors. What it does is chosen by
fields in the request's JSON body, so the same fake can run in its own process for the benchmark:
`python test_qlite.py --fake-ollama PORT`.
"""

import json
import os
import queue
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib
from unittest import mock

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


def holds_connection(pid, local_port, remote_port):
    """Whether a process still holds the TCP connection between these two loopback ports."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    inodes = {row[9] for row in rows if row[9] != "0"  # 0: orphaned, the process let go
              and int(row[1].split(":")[1], 16) == local_port
              and int(row[2].split(":")[1], 16) == remote_port}
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) in {"socket:[%s]" % i for i in inodes}:
                return True
        except OSError:  # closed meanwhile
            pass
    return False


def unread_bytes(local_port, remote_port):
    """Bytes the kernel still holds on the loopback connection between these ports, both ways."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(int(n, 16) for row in rows for n in row[4].split(":")
               if {row[1].split(":")[1], row[2].split(":")[1]}
               == {"%04X" % local_port, "%04X" % remote_port})


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
                number = self.connections
            threading.Thread(target=self.serve, args=(conn, number), daemon=True).start()

    def serve(self, conn, number):
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
                       "headers": headers, "hmap": hmap, "body": body, "raw_head": head,
                       "conn": number}  # which connection carried it
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
        if path == "/nobody":  # says chunked on an answer that has no body: HEAD, 204, 304
            status = int(req["target"].partition("?")[2] or 200)
            self.send_head(conn, status, "application/json", "Transfer-Encoding: chunked\r\n")
            return True
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
            conn.sendall(b"HTTP/1.1 %d Interim\r\nLink: </s.css>; rel=preload\r\n\r\n" % code
                         if isinstance(code, int) else b"HTTP/1.1 %s\r\n\r\n" % code.encode())
        if "raw_head" in opts:  # exactly these bytes, then nothing
            conn.sendall(opts["raw_head"].encode("latin-1"))
            self.wait_peer(conn, 5)
            return False
        sse = path.startswith("/v1/")
        records = self.records(path, opts, n)
        if "cut_at" in opts:  # the last record ends early, just after these bytes
            end = records[-1].index(opts["cut_at"].encode()) + len(opts["cut_at"])
            records[-1] = records[-1][:end]
        if opts.get("stream") is False and sse:  # Ollama puts its usage last, as OpenAI does
            return self.send_json(conn, 200, {
                "id": "c1", "object": "chat.completion", "created": 1, "model": "fake",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "tok0"}}],
                "usage": {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}})
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
        if fail and sent >= fail_after:  # every record out, then the failure
            return self.fail_stream(conn, fail)
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
            if (opts.get("stream_options") or {}).get("include_usage"):  # as Ollama sends it
                out.append(b'data: {"id":"c1","object":"chat.completion.chunk","created":1,'
                           b'"model":"fake","choices":[],"usage":{"prompt_tokens":4,'
                           b'"completion_tokens":%d,"total_tokens":%d}}\n\n' % (n, n + 4))
            out.append(b"data: [DONE]\n\n")
            out = sse_framing(out, opts.get("sse", "lf"))
        elif path in ("/api/generate", "/api/chat"):
            msg = b'"message":{"role":"assistant","content":""},' if path == "/api/chat" \
                else b'"response":"",'
            out.append(b'{"model":"fake","created_at":"2025-01-01T00:00:00Z",%s"done":true,'
                       b'"done_reason":"stop","total_duration":5000000,"load_duration":1000,'
                       b'"prompt_eval_count":4,"prompt_eval_duration":2000,"eval_count":%d,'
                       b'"eval_duration":%d}\n' % (msg, n, n * 20000000))
            if "eval_count" in opts:  # a final line whose counts are odd
                out[-1] = out[-1].replace(b'"eval_count":%d' % n,
                                          b'"eval_count":' + str(opts["eval_count"]).encode())
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
        self.pumping = threading.Thread(target=self.pump, daemon=True)
        self.pumping.start()
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
        self.pumping.join(TIMEOUT)  # it reads to the end first: closing under it would raise
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

    def test_answers_that_have_no_body_end_at_their_head_even_if_chunked(self):
        c = self.conn()
        for method, target, status in (("HEAD", "/nobody", 200), ("POST", "/nobody?204", 204),
                                       ("POST", "/nobody?304", 304)):
            with self.subTest(method=method, status=status):
                r = c.request(method, target, b"" if method == "POST" else None)
                self.assertEqual(r.status, status)
                self.assertEqual(c.request("GET", "/api/version").status, 200)  # not hanging

    def test_a_client_that_pipelines_many_requests_holds_up_nobody(self):
        def answered():
            text = self.conn().request("GET", "/qlite/metrics").body.decode()
            return int(re.search(r'qlite_requests_total\{code="200"\} (\d+)', text).group(1))
        a, b = self.conn(), self.conn()
        self.assertEqual(b.request("GET", "/api/version").status, 200)  # both accepted by now
        before = answered()
        a.send(b"GET /qlite/health HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)  # 78 KB, not read yet
        b.send(b"GET /qlite/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        text = b.response().body.decode()  # answered while most of a's requests still wait
        done = int(re.search(r'qlite_requests_total\{code="200"\} (\d+)', text).group(1))
        self.assertLess(done - before, 1000)
        for _ in range(2000):  # and every one of a's is answered, in order
            self.assertEqual(a.response().json()["status"], "ok")

    def test_a_stream_runs_to_its_end_though_too_much_is_pipelined_behind_it(self):
        c = self.conn()
        c.request("POST", "/api/generate", {"n": 5, "hold": True}, read=False)
        self.assertEqual(c.head()[0], 200)
        self.assertIsNotNone(c.read_chunk())  # the fake holds the rest
        c.send(b"GET /qlite/health HTTP/1.1\r\nHost: x\r\n\r\n" * 10000)  # 390 KB, dropped
        ports = c.sock.getsockname()[1], self.gw.port
        wait_for(lambda: unread_bytes(*ports) == 0, message="the gateway to read it all")
        self.fake.release.set()
        chunks, complete = c.read_chunks()  # the stream is the last answer, and a whole one
        self.assertTrue(complete)
        self.assertEqual(len(chunks), 5)  # 4 tokens and the done line
        self.assertTrue(c.closed_by_peer())

    def test_a_request_forwarded_after_a_full_turn_of_pipelined_ones_leaves_the_loop_idle(self):
        def cpu_seconds():  # the gateway's user and system time
            with open("/proc/%d/stat" % self.gw.proc.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        c, body = self.conn(), json.dumps({"n": 2, "hold": True}).encode()
        c.send(b"GET /qlite/health HTTP/1.1\r\nHost: x\r\n\r\n" * 3  # the 4th of a turn...
               + b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
               % (len(body), body))  # ...goes upstream, which holds it
        for _ in range(3):
            self.assertEqual(c.response().json()["status"], "ok")
        self.assertEqual(c.head()[0], 200)
        before = cpu_seconds()
        time.sleep(1.0)  # no write interest while nothing waits to be written: no spinning
        self.assertLess(cpu_seconds() - before, 0.3)
        self.fake.release.set()
        self.assertTrue(c.read_chunks()[1])

    def test_each_request_has_a_connection_of_its_own_upstream(self):
        c = self.conn()  # one kept-alive client connection...
        before = len(self.fake.requests)
        for _ in range(3):
            self.assertEqual(c.request("GET", "/api/version").status, 200)
            self.assertEqual(len(c.request("POST", "/api/generate", {"n": 2}).chunks), 3)
            self.assertEqual(c.request("GET", "/close-after").status, 200)  # upstream hangs up
        carried = [r["conn"] for r in self.fake.requests[before:]]
        self.assertEqual(len(set(carried)), 9)  # ...nine upstream connections (probes aside)

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
        self.assertRegex(line, r'^127\.0\.0\.1:\d+ - "GET /api/version\?log=1" 200 \d+B '
                               r'ttfb=\d+\.\d+s \d+\.\d+s$')  # "-": no key


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
                 ("GET", "/v1/models/fake", None), ("GET", "/", None), ("HEAD", "/", None),
                 ("HEAD", "/api/tags", None), ("HEAD", "/api/version", None))  # as Ollama routes
        for method, path, body in light:
            with self.subTest(path=path, method=method):
                before = self.fake.count(path)
                self.assertNotEqual(self.conn().request(method, path, body).status, 503)
                self.assertEqual(self.fake.count(path), before + 1)  # it reached Ollama
        for method, path in (("POST", "/api/unknown"), ("POST", "/api/tags"), ("GET", "/api/x"),
                             ("HEAD", "/api/ps")):  # (GET only, in Ollama's router)
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

    def test_client_leaving_is_seen_even_behind_lots_of_pipelined_input(self):
        before = self.fake.peer_closed
        c = self.conn()
        c.request("POST", "/api/generate", {"n": 3, "hold": True}, read=False)
        c.head()
        c.read_chunk()
        c.send(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n" * 10000)  # 390 KB behind it
        c.close()
        wait_for(lambda: self.fake.peer_closed > before, message="upstream closed")
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
        for interim in ([103], [100], [102, 103], ["103"], ["100"], ["102", 103]):
            with self.subTest(interim=interim):
                r = self.post("/api/generate", {"n": 2, "interim": interim})
                self.assertEqual((r.status, len(r.chunks)), (200, 3))
                self.assertIsNone(r.header("link"))

    def test_an_invalid_response_head_is_a_502_as_in_nginx(self):
        for line in ("X-A: a\r\n b", "X-A: a\x00b", "X-A: a\rInjected: 1", "Content-Length : 2",
                     "Content-Length: 2\r\nContent-Length: 5", "Content-Length: 1_0",
                     "Content-Length: +2", "Transfer-Encoding: chunked\r\nContent-Length: 2",
                     "Content-Length: \u00b2"):  # a digit to str.isdigit(), not to int()
            with self.subTest(line=line):
                r = self.post("/api/generate", {"raw_head": "HTTP/1.1 200 OK\r\n%s\r\n\r\nokok"
                                                % line})
                self.assertEqual(r.status, 502)
                self.assertIn("invalid response head", r.json()["error"])
        r = self.post("/api/generate", {"raw_head": "HTTP/1.1 200 OK\x00\r\nContent-Length: 2"
                                                    "\r\n\r\nok"})
        self.assertEqual((r.status, r.reason, r.body), (200, "OK", b"ok"))  # our reason phrase

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


# ======================================================================== split invariance

# Wire builders and result shorthands for SplitInvarianceTest's tables, at module level because a
# class body cannot call its own staticmethods before Python 3.10.

SPLIT_GET = b"GET /api/tags HTTP/1.1\r\nHost: a\r\n\r\n"
GOT_GET = ("GET", "/api/tags", b"")  # SPLIT_GET as read_requests reports it
GOT_POST = ("POST", "/api/generate", b"")  # head_at_limit's request, as read_requests reports it
EARLY = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
OK_LINE = b"HTTP/1.1 200 OK"
ND_IN = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n")
SSE_IN = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
          b"Transfer-Encoding: chunked\r\n\r\n")
ND_OUT = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nX-Accel-Buffering: no\r\n"
          b"Transfer-Encoding: chunked\r\n\r\n")  # the head a client gets for ND_IN


def wire_request(method=b"GET", target=b"/api/tags", headers=b"", body=b"", eol=b"\r\n"):
    """A request: its head with the given header lines, then body as it is."""
    return b"%s %s HTTP/1.1%sHost: a%s" % (method, target, eol, eol) + headers + eol + body


def wire_posted(body, length=None):
    """A POST with a Content-Length body; length: what the header says, if not len(body)."""
    n = len(body) if length is None else length
    return wire_request(b"POST", b"/api/generate", b"Content-Length: %d\r\n" % n, body)


def wire_chunked(body):
    """A POST to /api/chat whose body (and what follows it) is given already chunked."""
    return wire_request(b"POST", b"/api/chat", b"Transfer-Encoding: chunked\r\n", body)


def chunk_each(records):
    """A chunked body with one chunk per record."""
    return b"".join(b"%x\r\n%s\r\n" % (len(r), r) for r in records) + b"0\r\n\r\n"


def ollama_ndjson(n=30):
    """A streamed Ollama reply: one JSON line per token, then the final line."""
    lines = [json.dumps({"model": "m", "created_at": "2024-01-01T00:00:00Z",
                         "response": "tok%d \u00e9\u20ac" % i, "done": False},
                        ensure_ascii=False).encode() + b"\n" for i in range(n)]
    return b"".join(lines) + b'{"model":"m","response":"","done":true,"eval_count":30}\n'


FIVE_LINES = ollama_ndjson(5).splitlines(True)  # a short Ollama reply, for the relay


def read_all(*requests, half=None, left=b""):
    """read_requests' result: these requests, then the one half read and the bytes left."""
    return list(requests) + [("half-read", half), ("left in buf", left)]


def refused(status, *requests):
    """read_requests' result: these requests, then an error that closes the connection."""
    return list(requests) + [("error", status)]


def decoded(body, left=b""):
    """decode_chunked's result for a body that ended, with the bytes after it."""
    return body, True, left


def waiting(body, left=b""):
    """decode_chunked's result for a body not ended yet, with the bytes of an unended line."""
    return body, False, left


def broken(status, body=b""):
    """decode_chunked's result for bad framing, with the body bytes decoded before it."""
    return body, ("error", status)


def head_at_limit(limit, extra=0, eol=b"\r\n", first=b"POST /api/generate HTTP/1.1"):
    """A message head whose end (its empty line included) falls extra bytes past limit."""
    start = b"%s%sHost: a%sX: " % (first, eol, eol)
    return start + b"a" * (limit + extra - len(start) - 2 * len(eol)) + eol + eol


def head_limit_rows(limit):
    """Request streams around a MAX_HEAD of limit, and what read_requests gives for them."""
    exact, past = head_at_limit(limit), head_at_limit(limit, 1)
    return [
        ("a head ending exactly at the limit", exact, read_all(GOT_POST)),
        ("a head ending one byte past the limit", past, refused(431)),
        ("bare LF, exactly at the limit", head_at_limit(limit, 0, b"\n"), read_all(GOT_POST)),
        ("bare LF, one byte past the limit", head_at_limit(limit, 1, b"\n"), refused(431)),
        ("empty lines, then a head exactly at the limit", b"\r\n" * limit + exact,
         read_all(GOT_POST)),
        ("a request, then a head exactly at the limit", SPLIT_GET + exact,
         read_all(GOT_GET, GOT_POST)),
        ("a request, then a head one byte past the limit", SPLIT_GET + past,
         refused(431, GOT_GET)),
        ("a stray CRLF, then a head past the limit", SPLIT_GET + b"\r\n" + past,
         refused(431, GOT_GET)),
        ("an unended head one byte short of the limit", exact[:limit - 1],
         read_all(left=exact[:limit - 1])),
        ("an unended head as long as the limit", exact[:limit - 4] + b"aaaa", refused(431)),
        ("an unended head far over the limit", exact[:-4] + b"a" * limit, refused(431)),
    ]


class SplitInvarianceTest(unittest.TestCase):
    """Each reader, fed whole, byte by byte, at every two-way split and at random splits."""

    SEED = int(os.environ.get("QLITE_SPLIT_SEED", "9112"))
    RANDOM_SPLITS = 200   # random multi-way splits per input (a tenth of it for long inputs)
    BYTEWISE_MAX = 5000   # inputs up to this long are also fed byte by byte
    TWO_WAY_MAX = 1000    # longer inputs: strided two-way splits, plus every cut near a CR or LF
    MAX_BODY = 64         # the max_body requests are read with, and chunked bodies' limit
    SMALL_HEAD = 256      # MAX_HEAD while the head-limit rows run byte by byte
    CHUNK_LINE = re.compile(rb"([0-9a-f]+)\r\n")
    NDJSON, SSE = "application/x-ndjson", "text/event-stream"  # the Framer's kinds
    LINE = 1024  # qlite.MAX_CHUNK_LINE (checked below): a chunk-size or trailer line's bytes

    # ==================================================================== tables
    # Rows are (name, input, what the whole feed gives, or None to pin nothing); every split of
    # the input must give what the whole feed gives.

    REQUEST_STREAMS = [  # a client's bytes, as read_requests reads them (max_body 64)
        ("GET, CRLF", SPLIT_GET, read_all(GOT_GET)),
        ("GET, bare LF", wire_request(eol=b"\n"), read_all(GOT_GET)),
        ("GET, CRLF and LF mixed", b"GET /api/tags HTTP/1.1\r\nHost: a\n\r\n", read_all(GOT_GET)),
        ("HTTP/1.0, no header", b"GET /api/version HTTP/1.0\r\n\r\n",
         read_all(("GET", "/api/version", b""))),
        ("absolute-form target", b"GET http://x/api/tags?a=1 HTTP/1.1\r\nHost: a\r\n\r\n",
         read_all(("GET", "/api/tags?a=1", b""))),
        ("empty CRLF lines before", b"\r\n\r\n" + SPLIT_GET, read_all(GOT_GET)),
        ("empty LF lines before", b"\n\n\n" + SPLIT_GET, read_all(GOT_GET)),
        # a bare CR is no empty line (issue #16): the head starts with it and is refused
        ("a run of CRLF, LF and CR before", b"\r\n\n\r\n\r\r\n" + b"\r\n" * 40 + SPLIT_GET,
         refused(400)),
        ("a lone CR before", b"\r" + SPLIT_GET, refused(400)),
        ("issue #16 (g): a lone CR before GET /", b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n",
         refused(400)),
        ("pipelined", SPLIT_GET + wire_posted(b'{"model":1}') + wire_request(b"HEAD", b"/"),
         read_all(GOT_GET, ("POST", "/api/generate", b'{"model":1}'), ("HEAD", "/", b""))),
        ("a stray CRLF between requests", SPLIT_GET + b"\r\n" + SPLIT_GET,
         read_all(GOT_GET, GOT_GET)),
        ("stray LF and CRLF between requests", wire_posted(b"{}") + b"\n\r\n\n" + SPLIT_GET,
         read_all(("POST", "/api/generate", b"{}"), GOT_GET)),
        ("Content-Length body", wire_posted(b'{"model":"m","prompt":"hi"}'),
         read_all(("POST", "/api/generate", b'{"model":"m","prompt":"hi"}'))),
        ("Content-Length body that looks like a head",
         wire_posted(b"GET / HTTP/1.1\r\n\r\n\r\n\r\n") + SPLIT_GET,
         read_all(("POST", "/api/generate", b"GET / HTTP/1.1\r\n\r\n\r\n\r\n"), GOT_GET)),
        ("Content-Length 0", wire_posted(b"") + SPLIT_GET, read_all(GOT_POST, GOT_GET)),
        ("Content-Length with leading zeros",
         wire_request(b"POST", b"/", b"Content-Length: 0005\r\n", b"hello"),
         read_all(("POST", "/", b"hello"))),
        ("trailer, CRLF", b"POST /api/generate HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked"
         b"\r\n\r\n0\r\nA: 1\r\n\r\n" + SPLIT_GET, read_all(GOT_POST, GOT_GET)),
        # a bare CR ends no trailer line: the GET is part of that bad line, never a request
        ("issue #16 (a): a bare CR after the last chunk",
         b"POST /api/generate HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0\r\n\rGET /api/tags HTTP/1.1\r\nHost: a\r\n\r\n", refused(400)),
        ("Content-Length over max_body", wire_posted(b"x" * 65) + SPLIT_GET, refused(413)),
        ("Content-Length at max_body", wire_posted(b"x" * 64) + SPLIT_GET,
         read_all(("POST", "/api/generate", b"x" * 64), GOT_GET)),
        ("bytes after the body: part of a head", wire_posted(b"{}") + b"GET /api/t",
         read_all(("POST", "/api/generate", b"{}"), left=b"GET /api/t")),
        ("a body left half-read", wire_posted(b"abc", length=10),
         read_all(half=("POST", "/api/generate", b"abc"))),
        ("a head left half-read", b"\r\nGET /api/tags HTTP/1.1\r\nHo",
         read_all(left=b"GET /api/tags HTTP/1.1\r\nHo")),
        ("malformed request line", b"GET /api/tags\r\n\r\n" + SPLIT_GET, refused(400)),
        ("unsupported version after a request", SPLIT_GET + b"GET / HTTP/9.9\r\n\r\n" + SPLIT_GET,
         refused(505, GOT_GET)),
        ("obs-fold", wire_request(headers=b"X: a\r\n b\r\n") + SPLIT_GET, refused(400)),
        ("Content-Length and Transfer-Encoding",
         wire_request(b"POST", b"/", b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"),
         refused(400)),
        ("gzip coding", wire_request(b"POST", b"/", b"Transfer-Encoding: gzip\r\n"), refused(501)),
        ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", refused(405)),
    ]

    CHUNKED_BODIES = [  # what follows a chunked head, decoded with limit 64; also sent as requests
        ("chunked", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" + SPLIT_GET,
         decoded(b"hello world", SPLIT_GET)),
        ("short extensions", b'5;a=b\r\nhello\r\n6 ; q="x y"\r\n world\r\n0;last\r\n\r\n'
         + SPLIT_GET, decoded(b"hello world", SPLIT_GET)),
        ("extensions: token and quoted-string values", b'5;a=b;c="q \\" x"\r\nhello\r\n0\r\n\r\n',
         decoded(b"hello")),
        ("upper-case size and a tab", b"A\t\r\n0123456789\r\n0\r\n\r\n", decoded(b"0123456789")),
        ("chunk data that looks like framing", b"9\r\n0\r\n\r\nGET \r\n0\r\n\r\n" + SPLIT_GET,
         decoded(b"0\r\n\r\nGET ", SPLIT_GET)),
        ("a trailer, dropped", b"0\r\nX-T: 1\r\n\r\n", decoded(b"")),
        ("a trailer, then a request", b"0\r\nA: 1\r\n\r\n" + SPLIT_GET, decoded(b"", SPLIT_GET)),
        ("a trailer, then a stray CRLF", b"0\r\nA: 1\r\n\r\n\r\n" + SPLIT_GET,
         decoded(b"", b"\r\n" + SPLIT_GET)),
        ("a trailer line at the limit", b"0\r\nX: " + b"y" * (LINE - 3) + b"\r\n\r\n",
         decoded(b"")),
        ("a few leading zeros", b"0005\r\nhello\r\n000\r\n\r\n" + SPLIT_GET,
         decoded(b"hello", SPLIT_GET)),
        ("leading zeros within the cap", b"0005\r\nhello\r\n0\r\n\r\n", decoded(b"hello")),
        ("more leading zeros", b"0000000005\r\nabcde\r\n0000\r\n\r\n", decoded(b"abcde")),
        ("a size line of zeros at the limit", b"0" * (LINE - 1) + b"5\r\nhello\r\n0\r\n\r\n",
         decoded(b"hello")),
        ("a chunk line one byte under the limit", b"5;" + b"x" * (LINE - 3) + b"\r\nhello\r\n0"
         b"\r\n\r\n" + SPLIT_GET, decoded(b"hello", SPLIT_GET)),
        ("a chunk line at the limit", b"5;" + b"x" * (LINE - 2) + b"\r\nhello\r\n0\r\n\r\n"
         + SPLIT_GET, decoded(b"hello", SPLIT_GET)),
        ("chunks at max_body", b"20\r\n" + b"a" * 32 + b"\r\n20\r\n" + b"b" * 32 + b"\r\n0\r\n\r\n",
         decoded(b"a" * 32 + b"b" * 32)),
        ("the last chunk, then bytes", b"0\r\n\r\nHTTP/1.1 200 OK\r\n",
         decoded(b"", b"HTTP/1.1 200 OK\r\n")),
        ("nothing yet", b"", waiting(b"")),
        ("a chunked body left half-read", b"5\r\nhel", waiting(b"hel")),
        ("a chunk size left half-read", b"5\r\nhello\r\n00", waiting(b"hello", b"00")),
        ("a trailer left half-read", b"0\r\nA: 1\r\n", waiting(b"")),
        # over the limit (see WITHOUT_A_LIMIT)
        ("an Ollama stream, then bytes", chunk_each(ollama_ndjson(8).splitlines(True))
         + b"HTTP/1.1 200 OK\r\n", broken(413)),
        ("size of 15 hex digits", b"fffffffffffffff\r\nx\r\n0\r\n\r\n", broken(413)),
        ("size of 15 hex digits, alone", b"fffffffffffffff\r\n", broken(413)),
        ("chunks over max_body", b"20\r\n" + b"a" * 32 + b"\r\n21\r\n" + b"b" * 33
         + b"\r\n0\r\n\r\n", broken(413, b"a" * 32)),
        # bad framing
        ("a chunk longer than its size", b"3\r\nhello\r\n0\r\n\r\n" + SPLIT_GET,
         broken(400, b"hel")),
        ("a chunk shorter than its size", b"7\r\nhello\r\n0\r\n\r\n" + SPLIT_GET,
         broken(400, b"hello\r\n")),
        ("bad framing after data", b"5\r\nhello\r\n3\r\nabcdef\r\n0\r\n\r\n",
         broken(400, b"helloabc")),
        ("bad framing after data, cut", b"5\r\nhello\r\n3\r\nabcdef\r\n", broken(400, b"helloabc")),
        ("bad size: not hex", b"x\r\nhello\r\n0\r\n\r\n", broken(400)),
        ("bad size: negative", b"-5\r\nhello\r\n0\r\n\r\n", broken(400)),
        ("bad size: empty line", b"\r\nhello\r\n0\r\n\r\n", broken(400)),
        ("bad size: 0x prefix", b"0x5\r\nhello\r\n0\r\n\r\n", broken(400)),
        ("bad size: space before", b" 5\r\nhello\r\n0\r\n\r\n", broken(400)),
        ("bad size: two numbers", b"5 5\r\nhello\r\n0\r\n\r\n", broken(400)),
        ("bad size: CR CR LF", b"5\r\r\nhello\r\n0\r\n\r\n", broken(400)),
        ("size of 16 hex digits", b"1000000000000000\r\nx\r\n0\r\n\r\n", broken(400)),
        ("size of 16 hex digits, alone", b"1000000000000000\r\n", broken(400)),
        ("zeros, then 16 hex digits", b"000" + b"1" * 16 + b"\r\nx\r\n", broken(400)),
        ("extension: no name", b"5;=b\r\nhello\r\n0\r\n\r\n", broken(400)),
        ("extension: a CR in a quoted string", b'5;a="x\ry"\r\nhello\r\n0\r\n\r\n', broken(400)),
        ("issue #16 (e): extension of a NUL and a bare CR", b"5;\x00\rX\r\nhello\r\n0\r\n\r\n",
         broken(400)),
        # every line of a chunked body ends in CRLF (issue #16 (f))
        ("bare LF", b"5\nhello\n0\n\n" + SPLIT_GET, broken(400)),
        ("LF after the data only", b"5\r\nhello\n0\r\n\r\n", broken(400, b"hello")),
        ("a bare CR after the data", b"5\r\nhello\r0\r\n\r\n", broken(400, b"hello")),
        ("trailers, bare LF", b"5\r\nhello\r\n0\nA: 1\nB: 2\n\n" + SPLIT_GET,
         broken(400, b"hello")),
        ("trailers, CRLF and LF mixed", b"0\r\nA: 1\nB: 2\r\n\n" + SPLIT_GET, broken(400)),
        ("bare LF, then trailers and bytes", b"5\nhello\n0\nA: 1\r\nB: 2\n\r\nGET / HTTP/1.1\r\n",
         broken(400)),
        # trailer lines are header lines (issue #16 (b), (c))
        ("issue #16 (b): a trailer of a NUL and no colon", b"0\r\n\x00garbage no colon\r\n\r\n",
         broken(400)),
        ("issue #16 (c): a trailer with no colon", b"0\r\nxxxx\r\n\r\n", broken(400)),
        ("a trailer with a bare CR", b"0\r\nA: 1\r2\r\n\r\n", broken(400)),
        ("a trailer with a space before its colon", b"0\r\nA : 1\r\n\r\n", broken(400)),
        ("an obs-folded trailer", b"0\r\nA: 1\r\n b\r\n\r\n", broken(400)),
        # the cap counts every byte of a line, leading zeros too (issue #16 (d))
        ("a chunk line one byte past the limit", b"5;" + b"x" * (LINE - 1) + b"\r\nhello\r\n0"
         b"\r\n\r\n" + SPLIT_GET, broken(400)),
        ("a 2,000-byte extension", b"5;" + b"x" * 2000 + b"\r\nhello\r\n0\r\n\r\n", broken(400)),
        ("a size line of zeros one byte past the limit", b"0" * LINE + b"5\r\nhello\r\n0\r\n\r\n",
         broken(400)),
        ("issue #16 (d): 1,100 zeros, then a size", b"0" * 1100 + b"5\r\nhello\r\n0\r\n\r\n",
         broken(400)),
        ("thousands of leading zeros", b"0" * 2000 + b"5\r\nhello\r\n" + b"0" * 2000
         + b"\r\n\r\n" + SPLIT_GET, broken(400)),
        ("3,000 zeros, then a size, then bytes",
         b"0" * 3000 + b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n", broken(400)),
        ("zeros, then the last chunk, then bytes", b"0" * 1500 + b"\r\n\r\nHTTP/1.1 200 OK\r\n",
         broken(400)),
        ("a trailer line one byte past the limit", b"0\r\nX: " + b"y" * (LINE - 2) + b"\r\n\r\n",
         broken(400)),
        ("a 2,000-byte trailer line", b"0\r\nX: " + b"y" * 2000 + b"\r\n\r\n", broken(400)),
        ("issue #16 (d): a 1,100-byte trailer line",
         b"0\r\n" + b"0" * 500 + b"x" * 600 + b"\r\n\r\n", broken(400)),
    ]

    WITHOUT_A_LIMIT = [  # the CHUNKED_BODIES the limit changes, and what they give without one
        ("an Ollama stream, then bytes", decoded(ollama_ndjson(8), b"HTTP/1.1 200 OK\r\n")),
        ("chunks over max_body", decoded(b"a" * 32 + b"b" * 33)),
        ("size of 15 hex digits", waiting(b"x\r\n0\r\n\r\n")),  # all the chunk's data so far
        ("size of 15 hex digits, alone", waiting(b"")),
    ]

    TWO = b"HTTP/1.1 200 OK\nContent-Length: 2"  # a final head, as read_head gives it
    DONE = b"d\r\n{\"done\":true}\n\r\n0\r\n\r\n"  # a chunked NDJSON body
    RESPONSE_HEADS = [  # an upstream's bytes: the final head (interim ones dropped), the rest
        ("a final head", ND_IN + DONE, (ND_IN[:-4], DONE)),
        ("100 Continue first", b"HTTP/1.1 100 Continue\r\n\r\n" + ND_IN + DONE, (ND_IN[:-4], DONE)),
        ("102, then 103 with a Link, then 200", b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 "
         b"Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + ND_IN + DONE,
         (ND_IN[:-4], DONE)),
        ("100, 102 and 103", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
         + EARLY + ND_IN + DONE, (ND_IN[:-4], DONE)),
        ("bare LF heads", b"HTTP/1.1 103 Early Hints\nLink: </a>\n\n" + TWO + b"\n\nok",
         (TWO, b"ok")),
        ("CRLF and LF mixed", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\n\r\n"
         b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\nok", (TWO, b"ok")),
        ("empty lines before and between", b"\r\n\nHTTP/1.1 100 Continue\r\n\r\n\r\n\n" + ND_IN
         + DONE, (ND_IN[:-4], DONE)),
        ("a body that looks like heads", b"HTTP/1.0 200 OK\r\nContent-Length: 40\r\n\r\n"
         b"HTTP/1.1 103 Early Hints\r\n\r\n\r\n\r\nHTTP/1.1", (b"HTTP/1.0 200 OK\r\n"
         b"Content-Length: 40", b"HTTP/1.1 103 Early Hints\r\n\r\n\r\n\r\nHTTP/1.1")),
        ("an interim head only", EARLY, (None, b"")),
        ("an interim head, then part of the final one",
         b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-",
         (None, b"HTTP/1.1 200 OK\r\nContent-")),
        ("204, then nothing", b"HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n",
         (b"HTTP/1.1 204 No Content\r\nDate: x", b"")),
    ]

    RESPONSE_HEAD_LIMITS = [  # the same, with MAX_HEAD at SMALL_HEAD
        ("a final head exactly at the limit", EARLY + head_at_limit(SMALL_HEAD, 0, first=OK_LINE),
         (head_at_limit(SMALL_HEAD, 0, first=OK_LINE)[:-4], b"")),
        ("a final head one byte past the limit",
         EARLY + head_at_limit(SMALL_HEAD, 1, first=OK_LINE), ("error", 502)),
        ("bare LF, exactly at the limit", EARLY + head_at_limit(SMALL_HEAD, 0, b"\n", OK_LINE),
         (head_at_limit(SMALL_HEAD, 0, b"\n", OK_LINE)[:-2], b"")),
        ("bare LF, one byte past the limit", EARLY + head_at_limit(SMALL_HEAD, 1, b"\n", OK_LINE),
         ("error", 502)),
        ("an interim head one byte past the limit",
         head_at_limit(SMALL_HEAD, 1, first=b"HTTP/1.1 103 Early Hints")
         + head_at_limit(SMALL_HEAD, first=OK_LINE), ("error", 502)),
        ("an unended final head as long as the limit",
         EARLY + head_at_limit(SMALL_HEAD, 0, first=OK_LINE)[:-4] + b"abcd", ("error", 502)),
        ("a request head one byte past the limit", head_at_limit(SMALL_HEAD, 1), ("error", 502)),
    ]

    NDJSON_BODIES = [  # (name, body, its chunks, its chunks when end("boom") ends it)
        ("LF lines", b'{"a":1}\n{"b":2}\n{"done":true}\n', None, None),
        ("CRLF lines", b'{"a":1}\r\n{"b":2}\r\n', [b'{"a":1}\r\n', b'{"b":2}\r\n'], None),
        ("blank lines", b'\n\n{"a":1}\n\n\n{"b":2}\n\r\n', None, None),
        ("a blank line after a CRLF", b'{"a":1}\r\n\n{"b":2}\n',
         [b'{"a":1}\r\n', b"\n", b'{"b":2}\n'], None),
        ("no final LF", b'{"a":1}\n{"b":2', [b'{"a":1}\n', b'{"b":2'],
         [b'{"a":1}\n', b'{"error": "boom"}\n']),
        ("a lone CR ends a line", b'{"a":1}\r{"b":2}\n', [b'{"a":1}\r', b'{"b":2}\n'], None),
        ("CR, CRLF and LF mixed", b"x\r\ny\rz\n\r\n\r\r\nw", None, None),
        ("ends in a CR", b'{"a":1}\n{"b":2}\r', None,  # the CR ends it: kept before an error
         [b'{"a":1}\n', b'{"b":2}\r', b'{"error": "boom"}\n']),
        ("multi-byte UTF-8", '{"r":"\u00e9\u20ac\U0001f600"}\n'.encode(), None, None),
        ("an Ollama stream", ollama_ndjson(), ollama_ndjson().splitlines(True), None),
        ("nothing", b"", [], [b'{"error": "boom"}\n']),
    ]

    SSE_BODIES = [  # (name, body, its chunks, its chunks when end("boom") ends it)
        ("LF", b"data: a\n\ndata: b\n\n", [b"data: a\n\n", b"data: b\n\n"], None),
        ("CRLF", b"data: a\r\n\r\ndata: b\r\n\r\n", None, None),
        ("lone CR", b"data: a\r\rdata: b\r\r", None, None),
        ("lone CR, then LF and CRLF", b"data: a\r\rdata: b\n\r\n",
         [b"data: a\r\r", b"data: b\n\r\n"], None),
        ("LF data, CRLF pings", b'data: {"x":1}\n\n: ping\r\n\r\ndata: {"x":2}\n\n: ping\r\n\r\n',
         None, None),
        ("CRLF data, LF pings", b"data: a\r\n\r\n: ping\n\ndata: b\r\n\r\n", None, None),
        ("CRLF data and ping, LF data", b"data: a\r\n\r\n: ping\r\n\r\ndata: b\n\n",
         [b"data: a\r\n\r\n", b": ping\r\n\r\n", b"data: b\n\n"], None),
        ("every mix", b"data: a\n\r\n: ping\r\n\r\ndata: b\r\rdata: c\r\n\ndata: d\r\r\n",
         None, None),
        ("three LF", b"data: a\n\n\ndata: b\n\n", [b"data: a\n\n", b"\ndata: b\n\n"], None),
        ("runs of line ends", b"data: a\r\n\r\n\r\n\r\ndata: b\n\n\n\ndata: c\r\r\r\r", None, None),
        ("CR CR LF", b"a\r\r\nb\r\n\r\r\n\ndata: c\n\r\r\n", None, None),
        ("comment-only events", b": ping\n\n: ping\r\n\r\n:\n\n", None, None),
        ("multi-line event", b"event: x\ndata: 1\ndata: 2\nid: 3\nretry: 10\n\n", None, None),
        ("unfinished last event", b"data: a\n\ndata: b\n", None, None),
        ("an event cut short", b"data: a\n\ndata: b", None, [b"data: a\n\n",
         b'data: {"error": {"message": "boom", "type": "api_error"}}\n\n']),
        ("ends in CR", b"data: a\n\ndata: b\r", None, None),
        ("ends in CR CR", b"data: a\r\r", None, None),
        ("ends in LF CR", b"data: a\n\r", None, None),
        ("ends in CRLF CR", b"data: a\r\n\r", None, None),
        ("an OpenAI stream", b"".join(b'data: {"choices":[{"delta":{"content":"t%d"}}]}\n\n' % i
                                      for i in range(40)) + b"data: [DONE]\n\n", None, None),
        ("nothing", b"", [], None),
    ]

    LONG_RECORDS = [  # (kind, name, body) framed with MAX_RECORD 32
        (NDJSON, "an over-long line among short ones",
         b'{"a":1}\n{"long":"' + b"x" * 100 + b'"}\r\n{"b":2}\n\n{"c":3}\n' + b"y" * 80),
        (SSE, "an over-long event among short ones",
         b"data: a\n\ndata: " + b"y" * 100 + b"\r\n\r\ndata: b\n\n: ping\r\n\r\n"
         b"data: " + b"z" * 70 + b"\n\ndata: c\r\r"),
        # a line that a lone CR ends waits for the next byte: it must not join an over-long line
        (NDJSON, "a line ended by a lone CR, then an over-long line",
         b'{"a":1}\r' + b"b" * 40 + b'\n{"c":3}\n'),
    ]

    RELAYED_FIVE = (ND_OUT, (FIVE_LINES, True), False)  # however Ollama chunked FIVE_LINES
    UPSTREAM_RESPONSES = [  # a reply to POST /api/chat: (client's head, its body, cut short)
        ("NDJSON, a line per chunk", ND_IN + chunk_each(FIVE_LINES), RELAYED_FIVE),
        ("NDJSON, chunks across lines", ND_IN + chunk_each(
            [b"".join(FIVE_LINES)[a:a + 37] for a in range(0, len(b"".join(FIVE_LINES)), 37)]),
         RELAYED_FIVE),
        ("103, then NDJSON", EARLY + ND_IN + chunk_each(FIVE_LINES), RELAYED_FIVE),
        ("NDJSON with a trailer, dropped", ND_IN + b"8\r\n{\"a\":1}\n\r\n0\r\nX-T: 1\r\n\r\n",
         (ND_OUT, ([b'{"a":1}\n'], True), False)),
        ("SSE across chunks", SSE_IN + b"9\r\ndata: a\r\n\r\n12\r\n\r\n: ping\r\n\r\ndata: b"
         b"\n\n\r\n0\r\n\r\n", None),
        ("SSE, close-delimited", b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
         b"data: a\r\n\r\n: ping\r\n\r\ndata: b\n\n",
         (ND_OUT.replace(b"application/x-ndjson", b"text/event-stream"),
          ([b"data: a\r\n\r\n", b": ping\r\n\r\n", b"data: b\n\n"], True), False)),
        ("JSON with a length", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
         b"Content-Length: 11\r\n\r\n{\"a\":\"b\"}\n\n", (b"HTTP/1.1 200 OK\r\nContent-Type: "
         b"application/json\r\nContent-Length: 11\r\n\r\n", b'{"a":"b"}\n\n', False)),
        ("bad framing mid-stream", ND_IN + b"8\r\n{\"a\":1}\n\r\n5\r\n{\"b\":2}\n\r\n",
         (ND_OUT, ([b'{"a":1}\n', b'{"error": "chunk longer than its size"}\n'], True), False)),
        ("bare LF chunk lines", ND_IN + b"8\n{\"a\":1}\n\n0\n\n",
         (ND_OUT, ([b'{"error": "bad chunk size or extension"}\n'], True), False)),
        ("cut short", ND_IN + chunk_each(FIVE_LINES)[:-30], None),
        ("a malformed status line", b"HTP/1.1 200 OK\r\n\r\n", ("error", 502)),
        ("a header line with no colon", b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", ("error", 502)),
        ("closed before the head ends", b"HTTP/1.1 200 OK\r\nContent-", ("error", 502)),
        ("an unframed chunked body, cut short", b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nab",
         (ND_OUT.replace(b"application/x-ndjson", b"x"), (b"helloab", False), True)),
    ]

    # ==================================================================== splitting machinery

    @staticmethod
    def pieces(data, cuts):
        """data cut at the given offsets."""
        bounds = [0] + list(cuts) + [len(data)]
        return [data[a:b] for a, b in zip(bounds, bounds[1:])]

    @staticmethod
    def random_cuts(rng, n, marks, few=False):
        """A random multi-way split: a few cuts, many small pieces, or cuts at line ends."""
        style = rng.choice((0, 2) if few else (0, 1, 2))
        if style == 0 or not marks:
            return sorted(rng.sample(range(1, n), rng.randint(1, min(n - 1, 8))))
        if style == 1:
            cuts, at, most = [], 0, rng.choice((2, 3, 5, 17, 64))
            while True:
                at += 1 + int(rng.random() * most)
                if at >= n:
                    return cuts
                cuts.append(at)
        return sorted(rng.sample(marks, rng.randint(1, min(len(marks), 8 if few else 12))))

    def splits(self, data, two_way_max=None, random_splits=None, few=False):
        """(kind, cuts) pairs: two-way splits, byte by byte, then random ones (fixed seed)."""
        # few: an input too long to be read in many pieces (read_head rescans its buffer)
        n = len(data)
        two_way_max = self.TWO_WAY_MAX if two_way_max is None else two_way_max
        marks = sorted({j for i, c in enumerate(data) if c in b"\r\n"
                        for j in (i - 1, i, i + 1, i + 2) if 0 < j < n})
        if n <= two_way_max:
            two_way = range(1, n)
        else:  # strided, plus the first and last bytes and cuts around line ends
            marks = marks[::len(marks) // 300 + 1]
            two_way = sorted(set(range(1, n, n // (40 if few else 200) + 1)) | set(marks)
                             | set(range(1, min(n, 9))) | set(range(max(1, n - 8), n)))
        for i in two_way:
            yield "two-way split", [i]
        if n <= self.BYTEWISE_MAX and not few:
            yield "byte by byte", list(range(1, n))
        if random_splits is None:
            random_splits = self.RANDOM_SPLITS if n <= self.TWO_WAY_MAX else \
                self.RANDOM_SPLITS // 4 if n <= self.BYTEWISE_MAX else self.RANDOM_SPLITS // 10
        rng = random.Random(self.SEED ^ zlib.crc32(data))
        for _ in range(random_splits if n > 1 else 0):
            yield "random split (seed %d)" % self.SEED, self.random_cuts(rng, n, marks, few)

    def shrink(self, data, cuts, result, whole):
        """Fewer cuts that still give a result other than the whole feed's."""
        cuts, size = list(cuts), max(1, len(cuts) // 2)
        while True:
            at = 0
            while at < len(cuts):
                trial = cuts[:at] + cuts[at + size:]
                if result(self.pieces(data, trial)) != whole:
                    cuts = trial
                else:
                    at += size
            if size == 1:
                return cuts
            size //= 2

    def check_splits(self, name, data, result, **limits):
        """result(pieces) is the same for every split of data as for data whole; returns it."""
        whole, seen = result([data]), {()}
        for kind, cuts in self.splits(data, **limits):
            if tuple(cuts) in seen:
                continue
            seen.add(tuple(cuts))
            got = result(self.pieces(data, cuts))
            if got != whole:
                small = self.shrink(data, cuts, result, whole)
                got = result(self.pieces(data, small))
                shown = " | ".join(self.show(p) for p in self.pieces(data, small)) \
                    if len(small) <= 6 else "(%d pieces)" % (len(small) + 1)
                self.fail("%s: a %s gives another result than the whole feed\n"
                          "input (%d bytes): %s\nsplit at %s (shrunk from %d cuts): %s\n"
                          "whole gives: %s\nsplit gives: %s"
                          % (name, kind, len(data), self.show(data), small, len(cuts), shown,
                             self.show(whole), self.show(got)))
        return whole

    def check_table(self, rows, result, **limits):
        """Each row fed whole gives what it pins, and every split of it the same."""
        for name, data, expected in rows:
            with self.subTest(case=name):
                whole = result([data])
                if expected is not None and whole != expected:
                    self.fail("%s, fed whole:\ninput: %s\ngives:  %s\npinned: %s"
                              % (name, self.show(data), self.show(whole), self.show(expected)))
                self.check_splits(name, data, result, **limits)

    @classmethod
    def show(cls, value):
        """A short, readable repr: runs of one byte as b'x' * n, long values cut in the middle."""
        if isinstance(value, (bytes, bytearray)):
            value, parts, pos = bytes(value), [], 0
            for run in re.finditer(rb"(.)\1{15,}", value, re.S):
                if run.start() > pos:
                    parts.append(repr(value[pos:run.start()]))
                parts.append("%r * %d" % (run.group(1), len(run.group(0))))
                pos = run.end()
            if pos < len(value) or not parts:
                parts.append(repr(value[pos:]))
            text = " + ".join(parts)
        elif isinstance(value, list):
            text = "[%s]" % ", ".join(cls.show(v) for v in value)
        elif isinstance(value, tuple):
            text = "(%s)" % ", ".join(cls.show(v) for v in value)
        else:
            text = repr(value)
        return text if len(text) <= 700 else text[:340] + " ... " + text[-340:]

    @classmethod
    def dechunk(cls, wire):
        """A chunked body's chunks and whether the last chunk ended it; strict."""
        out, pos = [], 0
        while pos < len(wire):
            line = cls.CHUNK_LINE.match(wire, pos)
            if not line:
                return "malformed chunked body at %d: %r" % (pos, wire[pos:pos + 40])
            size, pos = int(line.group(1), 16), line.end()
            if size == 0:
                return (out, True) if wire[pos:] == b"\r\n" else "bytes after the last chunk"
            if wire[pos + size:pos + size + 2] != b"\r\n":
                return "chunk at %d does not end where its size says" % pos
            out.append(wire[pos:pos + size])
            pos += size + 2
        return out, False

    # ==================================================================== the readers' loops

    @staticmethod
    def take_heads(pieces):
        """Heads taken by read_head as each piece arrives, then an error or what is left."""
        buf, out = bytearray(), []
        try:
            for piece in pieces:
                buf += piece
                head = qlite.read_head(buf)
                while head is not None:
                    out.append(head)
                    head = qlite.read_head(buf)
        except qlite.ProtocolError as e:
            return out + [("error", e.status)]
        return out + [("left in buf", bytes(buf))]

    @staticmethod
    def read_response_head(buf):
        """The final response head, as Upstream.received takes it: interim 1xx ones dropped."""
        head = qlite.read_head(buf, too_large=502)
        while head is not None and qlite.INTERIM.match(head):
            head = qlite.read_head(buf, too_large=502)
        return head

    @classmethod
    def take_response_head(cls, pieces):
        """The final response head, as Upstream.received takes it; then the bytes after it."""
        buf, head = bytearray(), None
        try:
            for piece in pieces:
                buf += piece
                if head is None:
                    head = cls.read_response_head(buf)
        except qlite.ProtocolError as e:
            return "error", e.status
        return head, bytes(buf)

    @classmethod
    def read_requests(cls, pieces):
        """A client's request stream, read as Client.advance reads it."""
        buf, req, events, searched = bytearray(), None, [], 0
        try:
            for piece in pieces:
                buf += piece
                while True:
                    if req is None:
                        head = qlite.read_head(buf, searched)  # resumed, as Client.advance does
                        searched = len(buf) if head is None else 0
                        if head is None:
                            break
                        req = qlite.Request(head, cls.MAX_BODY)
                    req.parts.append(req.body.read(buf))
                    if not req.body.done:
                        break
                    events.append((req.method, req.target, b"".join(req.parts)))
                    req = None
        except qlite.ProtocolError as e:
            return refused(e.status, *events)  # the connection closes: nothing more is read
        half = None if req is None else (req.method, req.target, b"".join(req.parts))
        return read_all(*events, half=half, left=bytes(buf))

    @staticmethod
    def decode_chunked(pieces, limit=None):
        """What a chunked BodyReader decodes in all, and how it ended."""
        reader, buf, out = qlite.BodyReader(chunked=True, limit=limit), bytearray(), []
        try:
            for piece in pieces:
                buf += piece
                out.append(reader.read(buf))
        except qlite.ProtocolError as e:
            return broken(e.status, b"".join(out) + e.decoded)
        return b"".join(out), reader.done, bytes(buf)

    @classmethod
    def frame(cls, pieces, kind):
        """A Framer's chunks for the pieces: ended cleanly, and ended by end("boom")."""
        ok, failed = qlite.Framer(True, kind), qlite.Framer(True, kind)
        clean = cls.dechunk(b"".join(ok.frame(p) for p in pieces) + ok.end())
        sent = b"".join(failed.frame(p) for p in pieces)
        tail = failed.end("boom")
        if kind is None:  # chunks follow the reads here: compare what does not depend on them
            same = isinstance(clean, tuple) and clean[0] == [p for p in pieces if p]
            return (b"".join(clean[0]) if same else clean), same, tail
        return clean, cls.dechunk(sent + tail) if tail is not None else None

    @classmethod
    def relay(cls, pieces):
        """An upstream response as Upstream.received relays it: the client's head and body."""
        req = qlite.Request(b"POST /api/chat HTTP/1.1\r\nHost: a", 1024)
        buf, reader, framer, head, body, error = bytearray(), None, None, None, [], None
        try:
            for piece in list(pieces) + [b""]:  # b"": the upstream closes the connection
                if not piece:
                    if reader is not None and reader.left == qlite.NEVER:
                        break  # the body ends with the connection
                    raise qlite.ProtocolError(502, "upstream closed the connection early")
                buf += piece
                if reader is None:
                    raw = cls.read_response_head(buf)
                    if raw is None:
                        continue
                    _, head, reader, framer = qlite.plan_response(raw, req)  # (status first)
                body.append(framer.frame(reader.read(buf)))
                if reader.done:
                    break
        except qlite.ProtocolError as e:
            if framer is None:
                return "error", e.status
            body.append(framer.frame(e.decoded) if e.decoded else b"")
            error = str(e)
        tail = framer.end(error)
        wire = b"".join(body) + (tail or b"")
        if not framer.chunked:
            return head, wire, tail is None
        chunks = cls.dechunk(wire)
        if framer.kind is None and isinstance(chunks, tuple):
            chunks = b"".join(chunks[0]), chunks[1]
        return head, chunks, tail is None

    # ==================================================================== heads and requests

    def test_the_tables_know_the_chunk_line_cap(self):
        self.assertEqual(self.LINE, qlite.MAX_CHUNK_LINE)  # (the benchmark imports no qlite)

    def test_read_head(self):
        """read_head takes the same heads, and leaves the same bytes, however split."""
        streams = self.REQUEST_STREAMS + [(name, wire_chunked(body), None)
                                          for name, body, _ in self.CHUNKED_BODIES]
        short = [(name, data, None) for name, data, _ in streams if len(data) <= 1000]
        self.check_table(short, self.take_heads)  # a long body is no head: the rest will do

    def test_request_streams(self):
        """A client's request stream gives the pinned requests, errors and leftovers."""
        self.check_table(self.REQUEST_STREAMS, self.read_requests)

    def test_chunked_request_streams(self):
        """A chunked body in a request reads as it does alone, then what follows it is read."""
        rows = []
        for name, body, _ in self.CHUNKED_BODIES:
            got = self.decode_chunked([body], self.MAX_BODY)
            if got[1] is True:  # the body ended: the bytes after it are the next requests
                expected = [("POST", "/api/chat", got[0])] + self.read_requests([got[2]])
            elif got[1] is False:
                expected = read_all(half=("POST", "/api/chat", got[0]), left=got[2])
            else:
                expected = refused(got[1][1])
            rows.append((name, wire_chunked(body), expected))
        self.check_table(rows, self.read_requests)

    def test_head_limits(self):
        """The head size limit holds whole and split (MAX_HEAD made small to go byte by byte)."""
        with mock.patch.object(qlite, "MAX_HEAD", self.SMALL_HEAD):
            rows = head_limit_rows(self.SMALL_HEAD)
            self.check_table(rows, self.read_requests)
            for name, data, expected in rows:  # read_head alone refuses the same heads
                refuse = expected[-1][0] == "error"
                self.assertEqual(self.take_heads([data])[-1][0] == "error", refuse, name)

    def test_head_limits_at_full_size(self):
        """The real MAX_HEAD holds whole and split (strided splits: these heads are long)."""
        self.check_table(head_limit_rows(qlite.MAX_HEAD)[:4], self.read_requests, two_way_max=0,
                         random_splits=20, few=True)

    def test_response_heads(self):
        """Interim heads are dropped, the final one kept whole, the body left, however split."""
        self.check_table(self.RESPONSE_HEADS, self.take_response_head)
        with mock.patch.object(qlite, "MAX_HEAD", self.SMALL_HEAD):
            self.check_table(self.RESPONSE_HEAD_LIMITS, self.take_response_head)

    # ==================================================================== chunked bodies

    def test_chunked_bodies(self):
        """A chunked BodyReader decodes the pinned bytes and ends the pinned way, however split."""
        self.check_table(self.CHUNKED_BODIES,
                         lambda pieces: self.decode_chunked(pieces, self.MAX_BODY))

    def test_chunked_bodies_without_a_limit(self):
        """Without a limit (as from the upstream) bodies decode as pinned, however split."""
        bodies, unlimited = dict((row[0], row[1]) for row in self.CHUNKED_BODIES), {}
        for name, expected in self.WITHOUT_A_LIMIT:
            unlimited[name] = (name, bodies.pop(name), expected)
        for name, body in bodies.items():  # so that no row the limit changes goes unchecked
            self.assertEqual(self.decode_chunked([body]),
                             self.decode_chunked([body], self.MAX_BODY), name)
        self.check_table(list(unlimited.values()), self.decode_chunked)

    # ==================================================================== the Framer

    def check_framer(self, kind, rows):
        """Chunks as pinned and equal however split; payloads add up; end("boom") ends it."""
        for name, data, pinned, pinned_failed in rows:
            with self.subTest(case=name):
                clean, failed = self.check_splits(
                    name, data, lambda pieces: self.frame(pieces, kind))
                self.assertIsInstance(clean, tuple, clean)
                chunks, ended = clean
                self.assertTrue(ended, "no last chunk")
                self.assertEqual(b"".join(chunks), data, "payloads differ from the input")
                self.assertEqual(chunks, chunks if pinned is None else pinned)
                self.assertIsInstance(failed, tuple, failed)
                self.assertTrue(failed[1], "no last chunk after end(error)")
                self.assertIn(b'"boom"', failed[0][-1])
                self.assertIn(failed[0][:-1], (chunks, chunks[:-1]), "end(error) changed chunks")
                self.assertEqual(failed[0], failed[0] if pinned_failed is None else pinned_failed)

    def test_framer_ndjson(self):
        """NDJSON goes out one chunk per line, the same chunks however split."""
        self.check_framer(self.NDJSON, self.NDJSON_BODIES)

    def test_framer_sse(self):
        """SSE goes out one chunk per event, the same chunks however split."""
        self.check_framer(self.SSE, self.SSE_BODIES)

    def test_framer_unframed(self):
        """Without a kind each read is one chunk; the bytes add up, and end(error) cuts it."""
        for name, data, _, _ in self.NDJSON_BODIES + self.SSE_BODIES:
            with self.subTest(case=name):
                result = self.check_splits(name, data, lambda pieces: self.frame(pieces, None))
                self.assertEqual(result, (data, True, None))  # payload, a chunk per read, no end
                raw = qlite.Framer(False)
                self.assertEqual(b"".join(raw.frame(p) for p in self.pieces(data, [3, 5])), data)
                self.assertEqual(raw.end(), b"")

    def test_framer_waits_on_a_final_cr(self):
        """A CR at the end of a read may be half of a CRLF: the event waits for the next byte."""
        framer = qlite.Framer(True, self.SSE)
        self.assertEqual(framer.frame(b"data: a\r\n\r"), b"")
        self.assertEqual(framer.frame(b"\n"), b"b\r\ndata: a\r\n\r\n\r\n")

    def test_framer_long_records(self):
        """Over-long records go out in pieces; the bytes add up and other records stay whole."""
        small = 32  # MAX_RECORD while this runs
        for kind, name, data in self.LONG_RECORDS:
            whole = self.frame([data], kind)[0][0]  # the records, with the real MAX_RECORD
            ends = [sum(map(len, whole[:i + 1])) for i in range(len(whole))]
            long_records = [(end - len(r), end) for r, end in zip(whole, ends) if len(r) > small]

            def check(pieces, kind=kind, ends=ends, long_records=long_records):
                """The payload, or how the chunk boundaries break the rule."""
                (got, ended), _ = self.frame(pieces, kind)
                cuts = {sum(map(len, got[:i + 1])) for i in range(len(got))}
                for end in ends:  # the end of an over-long record may move into its line ends
                    if end not in cuts and not any(e == end and cuts & set(range(e - 3, e))
                                                   for _, e in long_records):
                        return "record end %d is no chunk boundary" % end
                for cut in cuts - set(ends):
                    if not any(a < cut < e for a, e in long_records):
                        return "chunk boundary %d inside a short record" % cut
                return b"".join(got), ended

            with mock.patch.object(qlite, "MAX_RECORD", small), self.subTest(case=name):
                self.assertEqual(self.check_splits(name, data, check), (data, True))
                bytewise = self.frame(self.pieces(data, range(1, len(data))), kind)[0][0]
                self.assertLessEqual(max(map(len, bytewise)), small + 1, "memory is not bounded")
        for kind, error in ((self.NDJSON, b'\n{"error": "boom"}\n'), (self.SSE, b"\n\ndata: {")):
            with mock.patch.object(qlite, "MAX_RECORD", small), self.subTest(kind=kind):
                framer = qlite.Framer(True, kind)  # an over-long record cut short by an error
                chunks = self.dechunk(framer.frame(b"data: " + b"q" * 40) + framer.end("boom"))
                self.assertEqual(chunks[0][0], b"data: " + b"q" * 40)
                self.assertTrue(chunks[0][1].startswith(error), chunks)

    # ==================================================================== upstream relay

    def test_upstream_relay(self):
        """An upstream response reaches the client as pinned, however split."""
        self.check_table(self.UPSTREAM_RESPONSES, self.relay)


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
            self.assertRaises(qlite.argparse.ArgumentTypeError, parse, bad)

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

    def test_an_upstream_name_that_cannot_be_resolved_is_one_line_and_exit_status_1(self):
        p = run_qlite("--upstream", "http://bad..host:1")  # (an empty label: no DNS asked)
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.strip().splitlines(), [p.stderr.strip()])
        self.assertIn("qlite: cannot resolve upstream 'bad..host'", p.stderr)

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

    def test_sigterm_keeps_a_client_that_is_sending_its_request(self):
        idle, c = self.gw.conn(), self.gw.conn()
        self.assertEqual(idle.request("GET", "/api/version").status, 200)
        c.send(b"GET /api/version HTTP/1.1\r\nHo")
        self.gw.proc.send_signal(signal.SIGTERM)
        self.assertTrue(idle.closed_by_peer(2))  # the drain has closed the idle connection...
        c.send(b"st: x\r\n\r\n")  # ...but not this one
        r = c.response()
        self.assertEqual((r.status, r.header("connection")), (200, "close"))
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


KEYS = """# who may use the model: NAME KEY, a person a line
alice   sk-alice-1
bob	sk-bob-2

  # an indented comment, and a line with spaces around it
  carol sk-carol-3  
"""


def keys_file(text=KEYS):
    """A keys file in a folder of its own, removed after the test run."""
    folder = tempfile.mkdtemp(prefix="qlite-keys-")
    path = os.path.join(folder, "keys.txt")
    with open(path, "w", encoding="latin-1") as f:
        f.write(text)
    return path


def as_key(key):
    return [("Authorization", "Bearer " + key)]


def key_metrics(gw, key):
    """The qlite_key_* figures of one key name, from /qlite/metrics (asked with that key)."""
    text = gw.get("/qlite/metrics", headers=as_key(key)).body.decode()
    return {m.group(1): int(m.group(3)) for m in re.finditer(
        r'^qlite_key_(\w+?)(_total)?\{key="%s"\} (\d+)$' % re.escape(NAMES[key]), text, re.M)}


NAMES = {"sk-alice-1": "alice", "sk-bob-2": "bob", "sk-carol-3": "carol", "sk-dave-4": "dave",
         "sk-admin": "api-key"}


class KeysTest(GatewayCase):
    """A key for each person: the name in the log and metrics, a share of the slots each."""
    flags = ("--keys", keys_file(), "--api-key", "sk-admin", "--max-per-key", "2",
             "--max-active", "4", "--upstream-timeout", "1")

    def hold(self, key, path="/api/generate", opts=None):
        """A stream that key holds open: its head and first chunk are in."""
        c = self.conn()
        c.request("POST", path, opts or {"n": 2, "hold": True}, headers=as_key(key), read=False)
        self.assertEqual(c.head()[0], 200)
        c.read_chunk()
        return c

    def test_each_listed_key_is_accepted_and_others_get_401(self):
        for key in NAMES:
            if key != "sk-dave-4":
                with self.subTest(key=key):
                    r = self.conn().request("GET", "/api/version", headers=as_key(key))
                    self.assertEqual(r.status, 200)
        before = len(self.fake.requests)
        for key in ("sk-alice-", "sk-alice-1x", "alice", "sk-dave-4", "sk-carol-3 x", ""):
            with self.subTest(key=key):
                r = self.conn().request("POST", "/api/generate", {"n": 1}, headers=as_key(key))
                self.assertEqual((r.status, r.header("www-authenticate")), (401, "Bearer"))
        self.assertEqual(len(self.fake.requests), before)

    def test_the_name_is_logged_and_never_the_key(self):
        self.conn().request("GET", "/api/version?who=1", headers=as_key("sk-bob-2"))
        line = wait_for(lambda: [x for x in self.gw.log if "?who=1" in x])[0]
        self.assertRegex(line, r'^127\.0\.0\.1:\d+ bob "GET /api/version\?who=1" 200 ')
        self.conn().request("GET", "/api/version?who=2", headers=as_key("sk-nobody"))
        line = wait_for(lambda: [x for x in self.gw.log if "?who=2" in x])[0]
        self.assertRegex(line, r'^127\.0\.0\.1:\d+ - "GET /api/version\?who=2" 401 ')
        metrics = self.gw.get("/qlite/metrics", headers=as_key("sk-admin")).body.decode()
        self.assertIn('qlite_key_requests_total{key="carol"} ', metrics)  # listed before use
        for key in NAMES:
            self.assertNotIn(key, "".join(self.gw.log) + metrics)

    def test_a_key_at_its_share_gets_429_while_other_keys_stream(self):
        before = key_metrics(self.gw, "sk-alice-1")
        held = [self.hold("sk-alice-1"), self.hold("sk-alice-1", "/v1/chat/completions",
                                                   {"n": 2, "stream": True, "hold": True})]
        self.assertEqual(key_metrics(self.gw, "sk-alice-1")["active"], 2)
        forwarded = len(self.fake.requests)
        r = self.conn().request("POST", "/api/generate", {"n": 1}, headers=as_key("sk-alice-1"))
        self.assertEqual((r.status, r.header("retry-after")), (429, "1"))
        self.assertIn("share", r.json()["error"])
        r = self.conn().request("POST", "/v1/chat/completions", {"n": 1},
                                headers=as_key("sk-alice-1"))
        self.assertEqual((r.status, r.json()["error"]["type"]), (429, "rate_limit_error"))
        self.assertEqual(len(self.fake.requests), forwarded)  # nothing reached Ollama
        for method in ("GET", "HEAD"):  # listing models is not counted against the share
            light = self.conn().request(method, "/api/tags", headers=as_key("sk-alice-1"))
            self.assertEqual(light.status, 200)
        other = self.conn().request("POST", "/api/generate", {"n": 3}, headers=as_key("sk-bob-2"))
        self.assertEqual((other.status, len(other.chunks)), (200, 4))
        self.assertEqual(key_metrics(self.gw, "sk-alice-1")["rejected"], before["rejected"] + 2)
        self.fake.release.set()
        for c in held:  # both run to their end
            self.assertTrue(c.read_chunks()[1])
        wait_for(lambda: key_metrics(self.gw, "sk-alice-1")["active"] == 0, message="freed")
        r = self.conn().request("POST", "/api/generate", {"n": 1}, headers=as_key("sk-alice-1"))
        self.assertEqual(r.status, 200)

    def test_the_share_is_freed_however_a_stream_ends(self):
        key = "sk-carol-3"
        endings = {
            "the client leaves": lambda: self.hold(key).close(),
            "the upstream resets": lambda: self.conn().request(
                "POST", "/api/generate", {"n": 3, "fail": "reset"}, headers=as_key(key)),
            "the upstream is silent": lambda: self.assertEqual(self.conn().request(
                "POST", "/api/generate", {"fail": "silent"}, headers=as_key(key)).status, 504),
            "the stream ends": lambda: self.conn().request(
                "POST", "/api/generate", {"n": 2}, headers=as_key(key))}
        for name, end in endings.items():
            with self.subTest(ending=name):
                self.fake.release.clear()
                end()
                self.fake.release.set()
                wait_for(lambda: key_metrics(self.gw, key)["active"] == 0, message="freed")
        self.fake.release.clear()
        both = [self.hold(key), self.hold(key)]  # the whole share is there again
        self.assertEqual(key_metrics(self.gw, key)["active"], 2)
        for c in both:
            c.close()


class KeysCountTest(unittest.TestCase):
    """What each key used: requests, refusals, tokens, counted exactly from zero."""

    def test_per_key_counters_are_exact(self):
        fake = FakeOllama()
        self.addCleanup(fake.stop)
        gw = GatewayProcess(fake.port, "--keys", keys_file(), "--max-per-key", "1", "--quiet")
        self.addCleanup(gw.stop)
        carol = as_key("sk-carol-3")
        for path, opts in (("/api/generate", {"n": 3}),  # streamed NDJSON: 4 + 3
                           ("/api/chat", {"n": 5, "stream": False}),  # one JSON body: 4 + 5
                           ("/v1/chat/completions", {"n": 2, "stream": False}),  # usage: 4 + 2
                           ("/v1/chat/completions",  # SSE with its usage event: 4 + 6
                            {"n": 6, "stream": True, "stream_options": {"include_usage": True}}),
                           ("/v1/chat/completions", {"n": 1, "stream": True})):  # no usage: 0
            with self.subTest(path=path, opts=opts):
                c = gw.conn()
                self.assertEqual(c.request("POST", path, opts, headers=carol).status, 200)
                c.close()
        c = gw.conn()
        c.request("POST", "/api/generate", {"n": 2, "hold": True}, headers=as_key("sk-bob-2"),
                  read=False)
        c.head()
        over = gw.conn()
        self.assertEqual(over.request("POST", "/api/generate", {"n": 1},
                                      headers=as_key("sk-bob-2")).status, 429)
        over.close()
        fake.release.set()
        self.assertEqual(len(c.read_chunks()[0]), 3)  # two tokens and the final line
        c.close()
        wait_for(lambda: key_metrics(gw, "sk-bob-2")["active"] == 0, message="bob's slot freed")
        self.assertEqual(key_metrics(gw, "sk-carol-3"), {
            "requests": 5, "active": 0, "rejected": 0, "prompt_tokens": 16,
            "completion_tokens": 16})
        bob = key_metrics(gw, "sk-bob-2")
        self.assertEqual((bob["rejected"], bob["prompt_tokens"], bob["completion_tokens"]),
                         (1, 4, 2))
        self.assertEqual(gw.get("/api/version").status, 401)  # counted under no name
        self.assertNotIn('key=""', gw.get("/qlite/metrics", headers=carol).body.decode())
        self.assertEqual(key_metrics(gw, "sk-alice-1")["requests"], 0)  # counted once it ends:
        self.assertEqual(key_metrics(gw, "sk-alice-1")["requests"], 1)  # the first question
        text = gw.get("/qlite/metrics", headers=carol).body.decode()
        self.assertIn("# TYPE qlite_key_active gauge", text)
        self.assertIn("# TYPE qlite_key_prompt_tokens_total counter", text)
        self.assertIn("qlite_generated_tokens_total 10\n", text)  # Ollama's own API: 3 + 5 + 2

    def test_tokens_count_once_reported_though_the_stream_then_breaks(self):
        fake = FakeOllama()
        self.addCleanup(fake.stop)
        gw = GatewayProcess(fake.port, "--keys", keys_file(), "--quiet")
        self.addCleanup(gw.stop)
        for options, lines, tokens in (  # tokens: the key's, in all
                ({"n": 3, "fail_after": 2}, 3, (0, 0)),  # broken before Ollama's counts
                ({"n": 3, "fail_after": 4}, 5, (4, 3)),  # broken after its final line
                # broken inside it, in eval_count's 12: a number cut short is not counted
                ({"n": 12, "fail_after": 13, "cut_at": '"eval_count":1'}, 13, (4 + 4, 3 + 0))):
            with self.subTest(**options):
                c = gw.conn()
                r = c.request("POST", "/api/generate", dict(options, fail="badchunk"),
                              headers=as_key("sk-carol-3"))
                c.close()
                self.assertEqual(len(r.chunks), lines)
                self.assertIn("error", json.loads(r.chunks[-1]))  # our error line ends it
                wait_for(lambda: key_metrics(gw, "sk-carol-3")["active"] == 0, message="freed")
                use = key_metrics(gw, "sk-carol-3")
                self.assertEqual((use["prompt_tokens"], use["completion_tokens"]), tokens)


class KeysReloadTest(unittest.TestCase):
    """SIGHUP re-reads the keys file; a broken one keeps the old keys."""

    def setUp(self):
        self.fake = FakeOllama()
        self.addCleanup(self.fake.stop)
        self.path = keys_file()
        self.gw = GatewayProcess(self.fake.port, "--keys", self.path)
        self.addCleanup(self.gw.stop)

    def reload(self, text, said):
        """Write text as the keys file (None: remove it), send SIGHUP, wait for its line."""
        if text is None:
            os.remove(self.path)
        else:
            with open(self.path, "w", encoding="latin-1") as f:
                f.write(text)
        seen = len(self.gw.log)
        self.gw.proc.send_signal(signal.SIGHUP)
        return wait_for(lambda: [x for x in self.gw.log[seen:] if said in x], message=said)[0]

    def status(self, key):
        return self.gw.get("/api/version", headers=as_key(key)).status

    def test_sighup_during_a_stream(self):
        c = self.gw.conn()
        c.request("POST", "/api/generate", {"n": 3, "hold": True}, headers=as_key("sk-alice-1"),
                  read=False)
        self.assertEqual(c.head()[0], 200)
        line = self.reload("bob sk-bob-2\ndave sk-dave-4\n", "keys re-read")
        self.assertIn("2 in force", line)
        self.assertEqual(self.status("sk-dave-4"), 200)  # new keys work
        self.assertEqual(self.status("sk-alice-1"), 401)  # a removed key: 401 on its next request
        self.assertEqual(self.status("sk-bob-2"), 200)
        self.fake.release.set()  # the stream in flight goes on to its end
        chunks, complete = c.read_chunks()
        self.assertEqual((len(chunks), complete), (4, True))
        self.assertTrue(json.loads(chunks[-1])["done"])
        c.close()

    def test_a_broken_file_on_reload_keeps_the_old_keys(self):
        line = self.reload("bob sk-bob-2\nbob sk-bob-3\n", "keys not re-read")
        self.assertIn("%s:2: duplicate name 'bob'" % self.path, line)
        self.assertEqual(self.status("sk-alice-1"), 200)  # the old keys stay
        self.assertEqual(self.status("sk-bob-3"), 401)
        line = self.reload(None, "keys not re-read")
        self.assertIn("cannot read %s" % self.path, line)
        self.assertEqual(self.status("sk-alice-1"), 200)
        self.assertIsNone(self.gw.proc.poll())  # the process lives on


class KeysFileTest(unittest.TestCase):
    """A keys file that cannot be read or parsed at start-up: exit 2, one line naming FILE:LINE."""

    def test_a_bad_keys_file_is_one_line_and_exit_status_2(self):
        missing = os.path.join(tempfile.mkdtemp(prefix="qlite-keys-"), "none.txt")
        for text, said in (
                (None, "cannot read %s: No such file or directory" % missing),
                ("alice\n", ":1: expected NAME KEY"),
                ("# fine\nalice sk-1 extra\n", ":2: expected NAME KEY"),
                ("al!ce sk-1\n", ":1: expected NAME KEY"),
                ("alice sk-\u00e9\n", ":1: expected NAME KEY"),
                ("alice sk-1\nbob sk-2\nalice sk-3\n", ":3: duplicate name 'alice'"),
                ("alice sk-1\nbob sk-1\n", ":2: duplicate key"),
                ("api-key sk-9\n", ":1: duplicate name 'api-key'")):
            with self.subTest(text=text):
                path = missing if text is None else keys_file(text)
                result = run_qlite("--keys", path, "--api-key", "sk-0", "--port", "0")
                self.assertEqual(result.returncode, 2)
                self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
                self.assertNotIn("Traceback", result.stderr)
                self.assertIn(said if text is None else path + said, result.stderr)


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

    def test_an_error_answer_survives_a_big_body_still_coming(self):
        c = self.conn()
        sent = []

        def upload():  # 20 MB after the head: linger must read it, or a reset eats the 413
            try:
                c.send(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000"
                       b"\r\n\r\n" + b"x" * 20000000)
                sent.append(True)
            except OSError as e:
                sent.append(e)
        t = threading.Thread(target=upload, daemon=True)
        t.start()
        t.join(TIMEOUT)
        self.assertEqual(sent, [True])
        r = c.response()
        self.assertEqual((r.status, r.header("connection")), (413, "close"))

    def test_absolute_form_with_broken_brackets_or_control_characters_is_400(self):
        for target in (b"http://[::1/api/tags", b"http://x/api/ta\tgs", b"http://x/api/\x01tags",
                       b"http://x]/api/tags"):
            with self.subTest(target=target):
                self.assert_refused(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target, 400)

    def test_http10_with_transfer_encoding_is_faulty_and_expect_is_ignored(self):
        self.assert_refused(b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"2\r\n{}\r\n0\r\n\r\n", 400)
        reply = raw_exchange(self.gw.port, b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\n"
                                           b"Content-Length: 2\r\n\r\n{}")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:40])

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

    def test_chunked_bodies_are_read_as_strictly_as_heads(self):
        post = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        get = b"GET /api/tags HTTP/1.1\r\nHost: a\r\n\r\n"
        for body in (  # each found by the attack run of issue 16: all 400, nothing forwarded
                b"0\r\n\r" + get,  # a bare CR "trailer" that would swallow the next request
                b"0\r\n\x00garbage no colon\r\n\r\n",
                b"0\r\nxxxx\r\n\r\n",
                b"0\r\nX: a\rb\r\n\r\n",
                b"0\r\n folded: x\r\n\r\n",
                b"0\r\n" + b"0" * 500 + b"x" * 600 + b"\r\n\r\n",  # a trailer over 1 KiB
                b"0" * 1100 + b"5\r\nhello\r\n0\r\n\r\n",  # zeros count against the cap
                b"5;\x00\rX\r\nhello\r\n0\r\n\r\n",
                b"5;a=\r\nhello\r\n0\r\n\r\n",
                b"5;a b\r\nhello\r\n0\r\n\r\n",
                b'5;a="x\r\nhello\r\n0\r\n\r\n',
                b"5\nhello\n0\n\n",  # bare LF line ends: refused, as h11 does
                b"5\r\nhello\n0\r\n\r\n",
                b"5\r\r\nhello\r\n0\r\n\r\n"):
            with self.subTest(body=body[:40]):
                self.assert_refused(post + body, 400)
        for body in (b"0005\r\nhello\r\n" + b"0" * 1000 + b"\r\n\r\n",
                     b'5;a=b ; c="x \\" y";d\r\nhello\r\n0;last\r\nA: 1\r\nB:\t2 \r\n\r\n'):
            with self.subTest(body=body[:40]):  # within the rules: read, trailers dropped
                c = self.conn()
                c.send(post + body)
                echoed = c.response().json()
                self.assertEqual(echoed["body"], "hello")
                self.assertNotIn("a", [k.lower() for k, _ in echoed["headers"]])
        self.assert_refused(post + b"0\r\n" + b"A: 1\r\n" * 101 + b"\r\n", 431)  # as for heads
        c = self.conn()
        c.send(post + b"0\r\n" + b"A: 1\r\n" * 100 + b"\r\n")  # at the limit: read
        self.assertEqual(c.response().status, 200)

    def test_a_long_run_of_spaces_in_a_header_costs_linear_time(self):
        stream = self.conn()  # another client's stream must not stall behind the parse
        stream.request("POST", "/api/generate", {"n": 2}, read=False)
        started = time.monotonic()
        reply = raw_exchange(self.gw.port, b"GET /api/version HTTP/1.1\r\nHost: x\r\nX: a"
                             + b" " * 65000 + b"b\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:80])
        self.assertLess(time.monotonic() - started, 3.0)  # quadratic: about 15 s
        self.assertEqual(stream.head()[0], 200)
        stream.close()

    def test_a_bare_cr_before_a_request_line_is_a_400(self):
        self.assert_refused(b"\rGET /api/tags HTTP/1.1\r\nHost: a\r\n\r\n", 400)
        self.assert_refused(b"\r\n\r\r\nGET /api/tags HTTP/1.1\r\nHost: a\r\n\r\n", 400)

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
        for _ in range(3):  # first uses allocate (code paths, buffers): not what is measured
            self.assertEqual(len(self.conn().request("POST", "/api/generate", {"n": 5}).chunks), 6)
            self.gw.get("/qlite/metrics")
        base, peak = rss_kib(self.gw.proc.pid), [0]
        flood = subprocess.Popen([sys.executable, "-c", FLOOD % self.gw.port],
                                 stdout=subprocess.PIPE, text=True)  # its own process and GIL
        self.addCleanup(flood.wait)
        self.addCleanup(flood.kill)
        said, port = flood.stdout.readline().split()
        self.assertEqual(said, "flooding")
        self.assertTrue(holds_connection(self.gw.proc.pid, self.gw.port, int(port)))
        r = self.conn().request("POST", "/api/generate", {"n": 5})  # others are still served
        self.assertEqual(len(r.chunks), 6)

        def cut_off():  # the kernel may keep trying to deliver: what counts is Q-Lite let go
            peak[0] = max(peak[0], rss_kib(self.gw.proc.pid))
            return not holds_connection(self.gw.proc.pid, self.gw.port, int(port))
        wait_for(cut_off, timeout=TIMEOUT, message="the flood cut after --client-timeout")
        flood.stdout.close()
        self.assertLess(peak[0] - base, 4 * 1024, "grew %d KiB" % (peak[0] - base))


FLOOD = """
import socket
s = socket.create_connection(("127.0.0.1", %d))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
sent, said = 0, False
try:
    while True:  # pipelined requests, never a byte read
        sent += s.send(b"GET /qlite/metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" * 500)
        if sent > 1 << 20 and not said:
            print("flooding", s.getsockname()[1], flush=True)
            said = True
except OSError:
    pass
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

    def test_an_odd_final_line_never_cuts_the_stream(self):
        for count in ("1e999", "-95", '{"a":' * 5000):
            with self.subTest(count=count[:10]):
                r = self.conn().request("POST", "/api/generate", {"n": 2, "eval_count": count})
                self.assertTrue(r.complete)
                self.assertEqual(len(r.chunks), 3)
        text = self.conn().request("GET", "/qlite/metrics").body.decode()
        self.assertGreaterEqual(int(re.search(r"generated_tokens_total (-?\d+)", text).group(1)), 0)

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
        c = self.conn()  # hangs up before the response head, after an earlier response
        self.assertEqual(c.request("GET", "/api/version").status, 200)
        c.request("POST", "/api/generate", {"fail": "silent"}, read=False)
        wait_for(lambda: self.gw.health()["active"] == 1, message="forwarded")
        c.close()
        line = wait_for(lambda: [x for x in self.gw.log if '"POST /api/generate" 499 ' in x])
        self.assertIn(" 499 0B ", line[0])  # no bytes of the earlier response
        self.assertEqual(counted(), before + 1)

    def test_health(self):
        h = self.gw.health()
        self.assertEqual(h, {"status": "ok", "active": 0, "light": 0, "max_active": 1,
                             "error": None, "upstream": "http://127.0.0.1:%d" % self.fake.port})
        r = self.conn().request("POST", "/qlite/health", b"")
        self.assertEqual((r.status, r.header("allow")), (405, "GET, HEAD"))
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


class SilentUpstreamTest(unittest.TestCase):
    """An Ollama host that takes no connection (its accept queue full: SYNs are dropped)."""

    def test_a_connect_that_hangs_is_a_504_and_the_probe_says_why(self):
        listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.addCleanup(listener.close)
        held = socket.create_connection(listener.getsockname())  # fills the queue, never accepted
        self.addCleanup(held.close)
        gw = GatewayProcess(listener.getsockname()[1], "--upstream-timeout", "1")
        self.addCleanup(gw.stop)
        start = time.monotonic()
        c = gw.conn()
        r = c.request("POST", "/api/generate", {"n": 1})
        c.close()
        self.assertEqual(r.status, 504)
        self.assertIn("did not answer in time", r.json()["error"])
        self.assertLess(time.monotonic() - start, 3.0)
        body = wait_for(lambda: gw.get("/qlite/health").json()["error"], message="probe gave up")
        self.assertEqual(body, "upstream did not accept a connection in 1s")
        self.assertEqual(gw.health()["active"], 0)  # the slot is free again


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

#!/usr/bin/env python3
"""Benchmark Q-Lite side by side with a direct connection to Ollama, nginx, Caddy and LiteLLM.

Standard library only. A fake Ollama (bench_fake.py: the fake of test_qlite.py with stamps and
close times added) runs in its own process and serves every target in the same run: direct (the
fake itself), Q-Lite (--quiet) and nginx (configured as people do for Ollama:
proxy_http_version 1.1, proxy_buffering off, an upstream keepalive pool, access log off, one
worker, limit_conn 10). Rounds are interleaved, in a shuffled order, so that drift of the machine
hits all targets alike; each figure is the median over rounds.

With --peers, the same rounds also measure what people run instead of Q-Lite, each run as its
own process with a generated configuration in a temporary folder:
- caddy: `reverse_proxy` with `flush_interval -1` and the upstream's Host; installed with
  `apt-get install -y caddy` when missing;
- litellm: LiteLLM proxy, installed with pip into bench/.venv when missing, configured as its
  docs say for Ollama (a model_list entry of type ollama_chat, a master key,
  max_parallel_requests 10 on the model, num_retries 0). It speaks only the OpenAI-style API, so
  every target is also compared on /v1/chat/completions (SSE).
A peer that cannot be installed is skipped with one line. The figures of the second table: memory
after start-up, launch to first proxied stream, per-token latency on NDJSON and on SSE, CPU per
1000 tokens, the 11th request while 10 streams are held, how soon the upstream connection closes
after the client leaves (while tokens flow, and while the upstream is silent), and memory growth
while a client reads a 50 MB answer slowly.

    python3 bench/bench_qlite.py [--rounds 7] [--json FILE] [--peers caddy,litellm]
                                 [--qlite PATH]
"""

import argparse, itertools, json, os, random, re, selectors, shutil, signal, socket
import statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
QLITE = os.path.join(ROOT, "qlite.py")
FAKE = os.path.join(HERE, "bench_fake.py")
VENV = os.path.join(HERE, ".venv")
sys.path.insert(0, HERE)
import bench_fake  # noqa: E402,F401  (imports test_qlite without importing qlite.py)
from test_qlite import NGINX_PROLOGUE, find_nginx, free_port  # noqa: E402
TICKS = os.sysconf("SC_CLK_TCK")
PEERS = ("caddy", "litellm")
NAMES = {"direct": "direct", "qlite": "Q-Lite", "nginx": "nginx", "caddy": "Caddy",
         "litellm": "LiteLLM"}
KEY = "sk-bench-master-key"     # LiteLLM's master key; every SSE request carries it
HOLD_LIMIT = 3.0                # the longest the fake waits on a held or silent request (s)
START = time.monotonic()

NGINX_CONF = NGINX_PROLOGUE + """
    limit_conn_zone $server_name zone=ollama:1m;  # one count for the server
    upstream ollama {
        server 127.0.0.1:%(upstream)d;
        keepalive 32;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:%(port)d;
        server_name ollama;
        limit_conn ollama 10;
        location / {
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:%(upstream)d;
            proxy_buffering off;
            proxy_read_timeout 600s;
        }
    }
}
"""

CADDYFILE = """{
	admin off
	auto_https off
}
http://127.0.0.1:%(port)d {
	reverse_proxy 127.0.0.1:%(upstream)d {
		flush_interval -1
		header_up Host {upstream_hostport}
	}
}
"""

LITELLM_CONFIG = """model_list:
  - model_name: fake
    litellm_params:
      model: ollama_chat/fake
      api_base: http://127.0.0.1:%(upstream)d
      max_parallel_requests: 10
litellm_settings:
  num_retries: 0
general_settings:
  master_key: %(key)s
"""


def progress(text):
    """One line on stderr, so that a long run shows it is alive."""
    print("[%4.0f s] %s" % (time.monotonic() - START, text), file=sys.stderr, flush=True)


# ============================================================================ processes

def wait_accepting(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.001)
    raise RuntimeError("nothing accepts on port %d" % port)


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Target:
    """Something to measure: its port, the processes whose CPU and memory it spends, its files."""

    def __init__(self, name, port, procs=(), folder=None, ndjson=True):
        self.name, self.port, self.procs, self.folder = name, port, list(procs), folder
        self.ndjson = ndjson            # LiteLLM has no Ollama-native (NDJSON) path
        self.launched = time.monotonic()

    def pids(self):
        """The processes and all their descendants."""
        pids, todo = [], [p.pid for p in self.procs]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children(pid))
        return pids

    def rss_kib(self):
        total = 0
        for pid in self.pids():
            try:
                total += rss_kib(pid)
            except (OSError, AttributeError):
                pass
        return total

    def alive(self):
        return all(p.poll() is None for p in self.procs)

    def log_tail(self):
        try:
            with open(os.path.join(self.folder, "log")) as f:
                return " | ".join(f.read().strip().splitlines()[-3:])
        except (OSError, TypeError):
            return ""

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # each target leads its own process group
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def popen(cmd, folder=None, **kw):
    """Start a target in its own process group, its output in folder/log (or nowhere)."""
    out = open(os.path.join(folder, "log"), "w") if folder else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, **kw)
    finally:
        if folder:
            out.close()


def start_fake():
    p = subprocess.Popen([sys.executable, FAKE], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    port = int(p.stdout.readline().split()[-1])
    return Target("direct", port, [p])


def spawn_qlite(path, upstream):
    port = free_port()
    target = Target("qlite", port)
    target.procs.append(popen([sys.executable, path, "--host", "127.0.0.1", "--port", str(port),
                               "--upstream", "127.0.0.1:%d" % upstream, "--quiet"]))
    return target


def write_config(name, filename, template, **values):
    """A fresh folder and port for a peer, its configuration file written there from template."""
    folder = tempfile.mkdtemp(prefix="qlite-bench-%s-" % name)
    port = free_port()
    conf = os.path.join(folder, filename)
    with open(conf, "w") as f:
        f.write(template % dict(values, dir=folder, port=port))
    return folder, port, conf


def spawn_nginx(upstream):
    folder, port, conf = write_config("nginx", "nginx.conf", NGINX_CONF, upstream=upstream)
    os.chmod(folder, 0o777)
    target = Target("nginx", port, folder=folder)
    target.procs.append(popen([find_nginx(), "-p", folder, "-c", conf, "-g", "daemon off;"],
                              folder))
    return target


def spawn_caddy(upstream):
    folder, port, conf = write_config("caddy", "Caddyfile", CADDYFILE, upstream=upstream)
    env = dict(os.environ, HOME=folder, XDG_DATA_HOME=folder, XDG_CONFIG_HOME=folder)
    target = Target("caddy", port, folder=folder)
    target.procs.append(popen([caddy_path(), "run", "--config", conf, "--adapter", "caddyfile"],
                              folder, env=env, cwd=folder))
    return target


def spawn_litellm(upstream):
    folder, port, conf = write_config("litellm", "config.yaml", LITELLM_CONFIG,
                                      upstream=upstream, key=KEY)
    # This machine may have no way out: take the model cost map LiteLLM ships instead of
    # fetching it (three tries, seconds of start-up where the network is closed).
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True")
    target = Target("litellm", port, folder=folder, ndjson=False)
    target.procs.append(popen([os.path.join(VENV, "bin", "litellm"), "--config", conf,
                               "--host", "127.0.0.1", "--port", str(port)],
                              folder, env=env, cwd=folder))
    return target


def wait_stream(target, timeout):
    """Poll until a short stream comes through target; seconds since its launch."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = chat(target.port, {"n": 3}, timeout=max(1.0, timeout))
            if status == 200 and b"tok2" in body:
                return time.monotonic() - target.launched
        except OSError:
            pass
        if not target.alive():
            raise RuntimeError("%s exited during start-up: %s" % (target.name, target.log_tail()))
        if time.monotonic() > deadline:
            raise RuntimeError("%s: no stream after %.0f s" % (target.name, timeout))
        time.sleep(0.001)


def start(spawn, timeout=120.0):
    """Launch a target and wait for its first proxied stream."""
    target = spawn()
    try:
        wait_stream(target, timeout)
    except BaseException:
        target.stop()
        raise
    return target


# ============================================================================ peers

def caddy_path():
    return shutil.which("caddy") or ("/usr/bin/caddy" if os.access("/usr/bin/caddy", os.X_OK)
                                     else None)


def run_logged(cmd, log):
    with open(log, "a") as f:
        f.write("$ %s\n" % " ".join(cmd))
        f.flush()
        return subprocess.call(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)


def install_caddy():
    """Caddy's path, installed from the system packages if missing; else why it is not there."""
    if caddy_path():
        return caddy_path(), None
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return None, "not installed, and installing it needs apt-get as root"
    log = os.path.join(tempfile.gettempdir(), "qlite-bench-caddy-install.log")
    progress("caddy: apt-get install -y caddy (log: %s)" % log)
    env_cmd = ["env", "DEBIAN_FRONTEND=noninteractive"]
    if run_logged(env_cmd + ["apt-get", "install", "-y", "caddy"], log) != 0:
        run_logged(env_cmd + ["apt-get", "update"], log)
        run_logged(env_cmd + ["apt-get", "install", "-y", "caddy"], log)
    if caddy_path():
        return caddy_path(), None
    return None, "apt-get install -y caddy failed (see %s)" % log


def install_litellm():
    """LiteLLM proxy in bench/.venv, installed with pip if missing; else why it is not there."""
    exe = os.path.join(VENV, "bin", "litellm")
    if os.access(exe, os.X_OK):
        return exe, None
    log = os.path.join(tempfile.gettempdir(), "qlite-bench-litellm-install.log")
    progress("litellm: pip install 'litellm[proxy]' into %s (a minute or two; log: %s)"
             % (VENV, log))
    if run_logged([sys.executable, "-m", "venv", VENV], log) != 0:
        return None, "python3 -m venv %s failed (see %s)" % (VENV, log)
    if run_logged([os.path.join(VENV, "bin", "pip"), "install", "-q", "litellm[proxy]"],
                  log) != 0 or not os.access(exe, os.X_OK):
        return None, "pip install 'litellm[proxy]' failed (see %s)" % log
    return exe, None


def versions(names):
    """Version strings of nginx, Caddy and LiteLLM, for the footer."""
    out = []
    if "nginx" in names:
        found = subprocess.run([find_nginx(), "-v"], capture_output=True, text=True).stderr
        out.append("nginx " + found.strip().split("/")[-1])
    if "caddy" in names:
        found = subprocess.run([caddy_path(), "version"], capture_output=True, text=True).stdout
        out.append("Caddy " + (found.split() or ["?"])[0].lstrip("v"))
    if "litellm" in names:
        found = subprocess.run([os.path.join(VENV, "bin", "python"), "-c",
                                "import importlib.metadata as m; print(m.version('litellm'))"],
                               capture_output=True, text=True).stdout
        out.append("LiteLLM proxy " + (found.strip() or "?"))
    return out


# ============================================================================ HTTP client

class Reply:
    """One HTTP/1.1 response parsed as bytes arrive: feed() returns the body bytes it decodes."""

    def __init__(self):
        self.buf, self.status, self.headers, self.done = b"", None, {}, False
        self.chunked, self.left, self.crlf = False, None, False

    def feed(self, data):
        if not data:
            self.done = True  # the peer closed: the end of a body without framing, or a cut
            return b""
        self.buf += data
        if self.status is None:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return b""
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            self.headers = dict((k.strip().lower(), v.strip()) for k, _, v in
                                (line.partition(":") for line in lines[1:]))
            self.buf = rest
            self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
            if not self.chunked and "content-length" in self.headers:
                self.left = int(self.headers["content-length"])
        out = []
        while self.buf and not self.done:
            if not self.chunked:
                if self.left is not None:
                    out.append(self.buf[:self.left])
                    self.left -= len(out[-1])
                    self.done = self.left == 0
                else:
                    out.append(self.buf)
                self.buf = b""
            elif self.left:
                out.append(self.buf[:self.left])
                self.buf, self.left = self.buf[self.left:], self.left - len(out[-1])
                self.crlf = not self.left
            elif self.crlf:
                if len(self.buf) < 2:
                    break
                self.buf, self.crlf = self.buf[2:], False
            else:
                line, sep, rest = self.buf.partition(b"\r\n")
                if not sep:
                    break
                self.buf, self.left = rest, int(line.split(b";")[0], 16)
                self.done = self.left == 0
        if self.status is not None and self.left == 0 and not self.chunked:
            self.done = True
        return b"".join(out)

    def kind(self):
        """The content type in a word."""
        ctype = self.headers.get("content-type", "").split(";")[0].strip().lower()
        return {"application/json": "JSON", "text/html": "HTML", "text/plain": "text",
                "text/event-stream": "SSE", "application/x-ndjson": "NDJSON"}.get(ctype, ctype)


def connect(port, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def post(sock, port, path, obj, headers=b""):
    body = json.dumps(obj).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%sContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), port, headers, len(body), body))


def post_chat(sock, port, script):
    """An OpenAI-style streaming chat request; the fake reads its script from the message."""
    post(sock, port, "/v1/chat/completions",
         {"model": "fake", "stream": True,
          "messages": [{"role": "user", "content": json.dumps(script)}]},
         b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n" % KEY.encode())


def read_until(sock, reply, done, timeout=30.0):
    """Read into reply until done(body so far) or the end; return the body."""
    sock.settimeout(timeout)
    body = b""
    while not reply.done and not (reply.status is not None and done(body)):
        body += reply.feed(sock.recv(65536))
    return body


def chat(port, script, timeout=30.0):
    """Status and body of a whole streaming chat request."""
    s = connect(port)
    try:
        post_chat(s, port, script)
        reply = Reply()
        body = read_until(s, reply, lambda b: False, timeout)
        return reply.status, body
    finally:
        s.close()


def fake_state(fake):
    s = connect(fake.port)
    try:
        s.sendall(b"GET /bench/state HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % fake.port)
        return json.loads(read_until(s, Reply(), lambda b: False, 10))
    finally:
        s.close()


def quiesce(fake, timeout=15.0):
    """Wait until the fake has no generation running (a gateway may still be draining one)."""
    deadline = time.monotonic() + timeout
    while fake_state(fake)["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)


# ============================================================================ measurements

def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


NDJSON_STAMP = re.compile(rb'"t":([0-9.]+)')
TEXT_STAMP = re.compile(rb'tok\d+@([0-9.]+)')


def token_latency(target, sse=False, streams=10, tokens=300, interval=0.002):
    """Seconds from the upstream's send to the client's parse: p50, p99, CPU, tokens, cuts."""
    # NDJSON on /api/generate, stamped in a "t" field; or SSE on /v1/chat/completions, stamped
    # inside each token's text, where a gateway that re-encodes the stream (LiteLLM) keeps it.
    # A stream that ends before its last token is counted as cut (Caddy 2.6 does that now and
    # then: caddyserver/caddy#5431); its tokens that did arrive are measured.
    sel = selectors.DefaultSelector()
    pids = target.pids()
    cpu0 = cpu_seconds(pids)
    for _ in range(streams):
        s = connect(target.port)
        if sse:
            post_chat(s, target.port, {"n": tokens, "delay": interval, "stamp_content": True})
        else:
            post(s, target.port, "/api/generate", {"n": tokens, "delay": interval, "stamp": True})
        sel.register(s, selectors.EVENT_READ, [Reply(), b"", 0])
    pattern = TEXT_STAMP if sse else NDJSON_STAMP
    latencies, cuts = [], 0
    while sel.get_map():
        events = sel.select(60)
        if not events:
            raise RuntimeError(target.name + ": streams stalled for 60 s")
        for key, _ in events:
            data = key.fileobj.recv(65536)
            now = time.monotonic()
            reply = key.data[0]
            body = key.data[1] + reply.feed(data)
            end = body.rfind(b"\n") + 1
            stamps = pattern.findall(body, 0, end)
            latencies.extend(now - float(t) for t in stamps)
            key.data[1], key.data[2] = body[end:], key.data[2] + len(stamps)
            if reply.done:
                if reply.status != 200:
                    raise RuntimeError("%s: status %s: %r" % (target.name, reply.status, body))
                cuts += key.data[2] < tokens
                sel.unregister(key.fileobj)
                key.fileobj.close()
    cpu = cpu_seconds(pids) - cpu0 if target.name != "direct" else None
    if cuts == streams:
        raise RuntimeError("%s: every stream was cut short" % target.name)
    if cuts:
        progress("%s: %d of %d streams cut short" % (NAMES[target.name], cuts, streams))
    return (percentile(latencies, 50), percentile(latencies, 99), cpu, len(latencies), cuts)


def bulk_throughput(target, lines=200000, merge=32):
    """Lines per second for one long stream, and the CPU the target spent per line."""
    s = socket.create_connection(("127.0.0.1", target.port))
    pids = target.pids()
    cpu0, start = cpu_seconds(pids), time.monotonic()
    post(s, target.port, "/api/generate", {"n": lines, "merge": merge})
    seen, last, tail = 0, b"", b""
    while not tail.endswith(b"\r\n0\r\n\r\n"):
        data = s.recv(1 << 20)
        if not data:
            raise RuntimeError(target.name + ": stream cut short")
        # Lines end in a bare LF; CRLF appears only in chunk framing, wherever chunks are cut.
        joined = last + data
        seen += joined.count(b"\n") - joined.count(b"\r\n") - (last == b"\n")
        last, tail = data[-1:], (tail + data)[-16:]
    elapsed = time.monotonic() - start
    s.close()
    if seen != lines + 1:
        raise RuntimeError("%s: %d lines, expected %d" % (target.name, seen, lines + 1))
    cpu = cpu_seconds(pids) - cpu0 if target.name != "direct" else None
    return seen / elapsed, cpu, seen


def small_requests(target, count=2000):
    """Latency of GET /api/version, one after another on one kept-alive connection."""
    s = socket.create_connection(("127.0.0.1", target.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % target.port
    times = []
    for i in range(count + 200):
        start = time.perf_counter()
        s.sendall(request)
        buf = b""
        while True:
            data = s.recv(65536)
            if not data:
                raise RuntimeError(target.name + ": connection closed after %d requests" % i)
            buf += data
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                if len(body) >= length:
                    break
        if i >= 200:  # the first 200 warm up
            times.append(time.perf_counter() - start)
    s.close()
    return percentile(times, 50), percentile(times, 99)


def memory_and_startup(qlite, upstream, runs=5):
    """RSS after start-up, of a bare interpreter, per idle connection; start-up time."""
    bare_code = ("import http.client, selectors, json, socket, sys\n"
                 "sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()")
    bare_rss, start_rss, per_conn, startup = [], [], [], []
    for _ in range(runs):
        bare = subprocess.Popen([sys.executable, "-c", bare_code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        bare.stdout.readline()
        bare_rss.append(rss_kib(bare.pid))
        bare.stdin.close()
        bare.wait()

        port = free_port()
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, qlite, "--host", "127.0.0.1", "--port", str(port),
                              "--upstream", "127.0.0.1:%d" % upstream, "--quiet"],
                             stderr=subprocess.DEVNULL)
        try:
            wait_accepting(port)
            startup.append(time.monotonic() - t0)
            time.sleep(0.2)  # let the probe connection close before reading the figure
            base = rss_kib(p.pid)
            start_rss.append(base)
            conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(1000)]
            deadline = time.monotonic() + 10
            while len(os.listdir("/proc/%d/fd" % p.pid)) < 1000 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            per_conn.append((rss_kib(p.pid) - base) / 1000.0)
            for c in conns:
                c.close()
        finally:
            p.terminate()
            p.wait()
    med = statistics.median
    return {"bare_rss_kib": med(bare_rss), "qlite_rss_kib": med(start_rss),
            "kib_per_idle_connection": med(per_conn), "startup_s": med(startup)}


class Cut(Exception):
    """A stream that ended before all of it arrived."""


def again_if_cut(name, measure, tries=3):
    """measure(), again when a stream was cut short (see token_latency)."""
    for attempt in range(tries):
        try:
            return measure()
        except Cut as e:
            if attempt == tries - 1:
                raise RuntimeError("%s: %s, %d times" % (name, e, tries))
            progress("%s: %s; measuring again" % (NAMES[name], e))


def eleventh_request(target, held=10):
    """Hold streams open, send one more: its status, content type, Retry-After?, time to head."""
    socks = []
    try:
        for _ in range(held):
            s = connect(target.port)
            post_chat(s, target.port, {"n": 3, "hold": True, "hold_limit": 5})
            socks.append(s)
        for s in socks:  # every held stream has its first token: it holds a slot
            reply = Reply()
            read_until(s, reply, lambda b: b"tok0" in b)
            if reply.status != 200:
                raise RuntimeError("%s: a held stream got %s" % (target.name, reply.status))
        s = connect(target.port)
        socks.append(s)
        reply = Reply()
        start = time.perf_counter()
        post_chat(s, target.port, {"n": 3})
        read_until(s, reply, lambda b: True)
        elapsed = time.perf_counter() - start
        return reply.status, reply.kind(), "retry-after" in reply.headers, elapsed
    finally:
        for s in socks:
            s.close()


TAGS = itertools.count()


def upstream_close_delay(target, fake, silent):
    """Seconds from the client's close to the upstream's close as the fake sees it; None: never."""
    # The client leaves mid-stream (tokens 2 ms apart), or while the upstream is silent (a model
    # loading); "never" is no close within HOLD_LIMIT.
    tag = "%s-%d" % (target.name, next(TAGS))
    s = connect(target.port)
    try:
        if silent:
            post_chat(s, target.port, {"fail": "silent", "tag": tag, "hold_limit": HOLD_LIMIT})
            deadline = time.monotonic() + 30
            while tag not in fake_state(fake)["started"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(target.name + ": the request never reached the fake")
                time.sleep(0.005)
            time.sleep(0.05)
        else:
            post_chat(s, target.port, {"n": int(2 * HOLD_LIMIT / 0.002), "delay": 0.002,
                                       "tag": tag, "hold_limit": HOLD_LIMIT})
            if b"tok19" not in read_until(s, Reply(), lambda b: b"tok19" in b):
                raise Cut("a stream was cut short")
    finally:
        left = time.monotonic()
        s.close()
    deadline = left + HOLD_LIMIT
    while time.monotonic() < deadline:
        closed = fake_state(fake)["closed"].get(tag)
        if closed is not None:
            return closed - left
        time.sleep(0.005)
    return None


def slow_read_growth(target, events=200, pad=250000, rate=25e6):
    """MiB the target's memory grows by while a client reads a 50 MB answer at `rate` bytes/s."""
    # 200 events of 250 kB: LiteLLM's time grows with the square of the number of events (5000
    # events of 10 kB take it 90 s), and this figure is about memory, not tokens.
    s = connect(target.port, rcvbuf=65536)
    try:
        base = peak = target.rss_kib()
        post_chat(s, target.port, {"n": events, "pad": pad})
        reply, got, sample = Reply(), 0, 0.0
        start = time.monotonic()
        s.settimeout(60)
        while not reply.done:
            got += len(reply.feed(s.recv(65536)))
            now = time.monotonic()
            if now >= sample:
                peak, sample = max(peak, target.rss_kib()), now + 0.02
            ahead = got / rate - (now - start)
            if ahead > 0:
                time.sleep(ahead)
        peak = max(peak, target.rss_kib())
    finally:
        s.close()
    if reply.status != 200:
        raise RuntimeError("%s: 50 MB answer: status %s" % (target.name, reply.status))
    if got < events * pad:
        raise Cut("the 50 MB answer was cut short at %d bytes" % got)
    return (peak - base) / 1024.0


def launch_figures(spawn):
    """On a fresh instance: seconds to its first proxied stream, MiB resident, MiB of growth."""
    target = spawn()
    try:
        launch = wait_stream(target, 120.0)
        time.sleep(0.1)
        rss = target.rss_kib() / 1024.0
        growth = slow_read_growth(target)
    finally:
        target.stop()
    return launch, rss, growth


def peer_round(target, fake, res, measure_ndjson):
    """The figures of the peers' table that are measured on a running target."""
    if measure_ndjson and target.ndjson:
        p50, p99, _, _, cuts = token_latency(target)
        res["token_p50"].append(p50)
        res["token_p99"].append(p99)
        res["cut"].append(cuts)
    p50, p99, cpu, tokens, cuts = token_latency(target, sse=True)
    res["sse_p50"].append(p50)
    res["sse_p99"].append(p99)
    res["sse_cpu_s"].append(cpu)
    res["sse_tokens"].append(tokens)
    res["cut"].append(cuts)
    quiesce(fake)
    status, kind, retry_after, elapsed = eleventh_request(target)
    res["eleventh"].append("%d %s%s" % (status, kind, " +Retry-After" if retry_after else ""))
    res["eleventh_s"].append(elapsed)
    quiesce(fake)
    res["close_streaming_s"].append(again_if_cut(
        target.name, lambda: upstream_close_delay(target, fake, silent=False)))
    quiesce(fake)
    res["close_silent_s"].append(upstream_close_delay(target, fake, silent=True))
    quiesce(fake)


# ============================================================================ rounds

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--peers", default="", metavar="LIST",
                        help="also measure these, comma-separated: " + ",".join(PEERS))
    parser.add_argument("--qlite", default=QLITE, metavar="PATH",
                        help="the qlite.py to measure (default: the repository's)")
    args = parser.parse_args()
    peers = [p.strip().lower() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p not in PEERS:
            parser.error("unknown peer %r (known: %s)" % (p, ", ".join(PEERS)))
    if not os.path.isfile(args.qlite):
        parser.error("--qlite: no such file: %s" % args.qlite)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop every target on the way out

    fake = start_fake()
    targets = [fake]
    try:
        spawners = {"qlite": lambda: spawn_qlite(args.qlite, fake.port)}
        if find_nginx():
            spawners["nginx"] = lambda: spawn_nginx(fake.port)
        else:
            print("nginx is not installed (apt-get install nginx-light): measuring without it")
        for name, install, spawn in (("caddy", install_caddy, spawn_caddy),
                                     ("litellm", install_litellm, spawn_litellm)):
            if name in peers:
                found, why = install()
                if found:
                    spawners[name] = lambda spawn=spawn: spawn(fake.port)
                else:
                    print("%s: skipped: %s" % (NAMES[name], why))
        for name, spawn in list(spawners.items()):
            progress("starting %s" % NAMES[name] + (" (takes seconds)" if name == "litellm"
                                                      else ""))
            try:
                targets.append(start(spawn))
            except RuntimeError as e:
                if name not in peers:
                    raise
                print("%s: skipped: %s" % (NAMES[name], e))
                del spawners[name]
        results = run_rounds(args, fake, targets, spawners, bool(peers))
        progress("Q-Lite's memory and start-up on fresh processes")
        memory = memory_and_startup(args.qlite, fake.port)
    finally:
        for t in targets:
            t.stop()
    figures = {}
    for name, res in results.items():
        figures[name] = summary(res)
    figures["memory"] = memory
    figures["instructions"] = count_instructions(args.qlite)
    report(figures, args.rounds)
    if peers:
        report_peers(figures, [t.name for t in targets], args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


def count_instructions(qlite):
    """bench/instructions.py's callgrind counts, or None (with why) when valgrind is missing."""
    if not shutil.which("valgrind"):
        print("instructions: skipped: valgrind is not installed (apt-get install -y valgrind)")
        return None
    progress("instructions per token event, under callgrind (takes about 20 s)")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, os.path.join(HERE, "instructions.py"), "--qlite", qlite,
                        "--json", out.name], check=True, stdout=subprocess.DEVNULL)
        with open(out.name) as f:
            return json.load(f)


def run_rounds(args, fake, targets, spawners, with_peers):
    """The interleaved rounds; every list in the result holds one value per round."""
    classic = ("direct", "qlite", "nginx")
    results = {t.name: {} for t in targets}
    for target in targets:  # warm every path once
        if target.name in classic:
            small_requests(target, 100)
            bulk_throughput(target, 20000)
        if with_peers:
            for _ in range(3):
                chat(target.port, {"n": 20})
    for r in range(args.rounds):
        started = time.monotonic()
        order = targets[:]
        random.shuffle(order)
        for target in order:
            res = results[target.name]
            for key in ("token_p50", "token_p99", "bulk_lps", "bulk_cpu_s", "bulk_lines",
                        "small_p50", "small_p99", "sse_p50", "sse_p99", "sse_cpu_s",
                        "sse_tokens", "eleventh", "eleventh_s", "close_streaming_s",
                        "close_silent_s", "launch_s", "rss_mib", "growth_mib", "cut"):
                res.setdefault(key, [])
            if target.name in classic:
                p50, p99, _, _, cuts = token_latency(target)
                res["token_p50"].append(p50)
                res["token_p99"].append(p99)
                res["cut"].append(cuts)
                lps, cpu, lines = bulk_throughput(target)
                res["bulk_lps"].append(lps)
                res["bulk_cpu_s"].append(cpu)
                res["bulk_lines"].append(lines)
                p50, p99 = small_requests(target)
                res["small_p50"].append(p50)
                res["small_p99"].append(p99)
            if with_peers:
                peer_round(target, fake, res, target.name not in classic)
        if with_peers:
            names = list(spawners)
            random.shuffle(names)
            for name in names:
                launch, rss, growth = again_if_cut(
                    name, lambda: launch_figures(spawners[name]))
                results[name]["launch_s"].append(launch)
                results[name]["rss_mib"].append(rss)
                results[name]["growth_mib"].append(growth)
                quiesce(fake)
        progress("round %d/%d done in %.0f s" % (r + 1, args.rounds, time.monotonic() - started))
    return results


# ============================================================================ report

def summary(res):
    """Medians over rounds; CPU per unit over all rounds; the most frequent answer."""
    out = {}
    for key, values in res.items():
        if key in ("bulk_cpu_s", "bulk_lines", "sse_cpu_s", "sse_tokens") or not values:
            continue
        if key == "cut":  # streams cut short, and how many streams the latency runs had
            out[key], out["latency_streams"] = sum(values), 10 * len(values)
        elif key == "eleventh":
            out[key] = max(set(values), key=values.count)
        elif key.startswith("close_"):
            # None is "never closed": it sorts above every time
            med = statistics.median([float("inf") if v is None else v for v in values])
            out[key] = None if med == float("inf") else med
            out[key + "_never"] = med == float("inf")
        else:
            out[key] = statistics.median(values)
    # CPU is read in clock ticks (10 ms): per unit it is the total over all rounds
    for cpu, count, key, scale in (("bulk_cpu_s", "bulk_lines", "bulk_cpu_us", 1e6),
                                   ("sse_cpu_s", "sse_tokens", "sse_cpu_s_per_1000", 1e3)):
        if res.get(cpu):
            out[key] = sum(res[cpu]) * scale / sum(res[count]) if res[cpu][0] is not None \
                else None
    return out


def number(v, scale=1.0):
    """A figure with about three significant digits; '-' when there is none."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    v *= scale
    if abs(v) >= 10000:
        return "{:,.0f}".format(v)
    if abs(v) >= 100:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    if abs(v) >= 1:
        return "%.2f" % v
    return "%.3f" % v


def table(header, rows):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    print()
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


def report(fig, rounds):
    q, d, n = fig["qlite"], fig["direct"], fig.get("nginx")
    rows = []

    def row(label, key, scale, unit, target_text, check):
        qv, dv, nv = q[key], d.get(key), n[key] if n else None
        ratio_n = qv / nv if nv else None
        ratio_d = qv / dv if dv else None
        met = check(qv, ratio_n) if (ratio_n is not None or "nginx" not in target_text) else None
        fmt = lambda v: "-" if v is None else ("%.2f" % (v * scale) if v * scale < 10 else
                                               "%.1f" % (v * scale) if v * scale < 1000
                                               else "{:,.0f}".format(v * scale))
        rows.append((label + " (" + unit + ")", fmt(dv), fmt(qv), fmt(nv),
                     "-" if ratio_n is None else "%.2fx" % ratio_n,
                     "-" if ratio_d is None else "%.2fx" % ratio_d, target_text,
                     "-" if met is None else ("yes" if met else "NO")))
    row("token latency p50", "token_p50", 1e6, "us", "<= 1.2x nginx", lambda v, r: r <= 1.2)
    row("token latency p99", "token_p99", 1e6, "us", "<= 1.4x nginx", lambda v, r: r <= 1.4)
    row("bulk throughput", "bulk_lps", 1, "lines/s", ">= 0.9x nginx", lambda v, r: r >= 0.9)
    row("gateway CPU per line", "bulk_cpu_us", 1, "us", "<= 1.5 us", lambda v, r: v <= 1.5)
    row("small request p50", "small_p50", 1e6, "us", "<= 2x nginx", lambda v, r: r <= 2.0)
    row("small request p99", "small_p99", 1e6, "us", "(no target)", lambda v, r: None)
    counted = fig.get("instructions")
    if counted:  # callgrind counts the gateway only: there is no figure for the others
        for label, key, target in (
                ("instructions per token event", "instructions_per_token_event", 35000),
                ("instructions per small request", "instructions_per_small_request", None)):
            value = counted[key]
            rows.append((label, "-", "{:,}".format(value), "-", "-", "-",
                         "<= {:,}".format(target) if target else "(no target)",
                         "-" if target is None else "yes" if value <= target else "NO"))
    m = fig["memory"]
    table(("figure", "direct", "Q-Lite", "nginx", "Q-Lite/nginx", "Q-Lite/direct", "target",
           "met"), rows)
    ratio = m["qlite_rss_kib"] / m["bare_rss_kib"]
    print()
    print("resident memory after start-up: Q-Lite %.1f MiB, bare interpreter (http.client, "
          "selectors, json, socket) %.1f MiB: %.2fx (target <= 1.3x: %s)" % (
              m["qlite_rss_kib"] / 1024, m["bare_rss_kib"] / 1024, ratio,
              "yes" if ratio <= 1.3 else "NO"))
    print("per idle connection (1000 open): %.2f KB (target <= 2 KB: %s)" % (
        m["kib_per_idle_connection"] * 1.024, "yes" if m["kib_per_idle_connection"] * 1.024 <= 2
        else "NO"))
    print("start-up until the port accepts: %.3f s (target < 0.15 s: %s)" % (
        m["startup_s"], "yes" if m["startup_s"] < 0.15 else "NO"))
    for name in ("direct", "qlite", "nginx"):
        if fig.get(name, {}).get("cut"):
            print("%s cut %d of %d streams short in the token latency runs" % (
                NAMES[name], fig[name]["cut"], fig[name]["latency_streams"]))
    print("medians over %d interleaved rounds; Python %s; %s" % (
        rounds, sys.version.split()[0], machine()))


def report_peers(fig, names, rounds):
    """The second table: every target side by side, and each gateway's ratio to Q-Lite."""
    cols = [n for n in ("direct", "nginx", "caddy", "litellm", "qlite") if n in names]
    others = [n for n in cols if n not in ("direct", "qlite")]
    q = fig["qlite"]
    rows = []

    def row(label, key, scale=1.0, text=None):
        cells = []
        for name in cols:
            f = fig[name]
            if text:
                cells.append(text(f))
            elif f.get(key + "_never"):
                cells.append("never")
            else:
                cells.append(number(f.get(key), scale))
        ratios = []
        for name in others:
            v, qv = fig[name].get(key), q.get(key)
            ok = not text and v is not None and qv
            ratios.append("%.2fx" % (v / qv) if ok and v / qv < 100 else
                          "%.0fx" % (v / qv) if ok else "-")
        rows.append([label] + cells + ratios)

    row("memory after start-up (MiB)", "rss_mib")
    row("launch to first proxied stream (s)", "launch_s")
    row("token latency p50, NDJSON (us)", "token_p50", 1e6)
    row("token latency p99, NDJSON (us)", "token_p99", 1e6)
    row("token latency p50, SSE (us)", "sse_p50", 1e6)
    row("token latency p99, SSE (us)", "sse_p99", 1e6)
    row("CPU per 1000 tokens, SSE (s)", "sse_cpu_s_per_1000")
    row("11th request, 10 streams held", None,
        text=lambda f: f.get("eleventh", "-") + (" (no cap)" if f.get("eleventh", "")
                                                 .startswith("200") else ""))
    row("  its time to answer (ms)", "eleventh_s", 1e3)
    row("upstream closed after client leaves (ms)", "close_streaming_s", 1e3)
    row("  same, upstream silent (ms)", "close_silent_s", 1e3)
    row("memory growth, 50 MB read slowly (MiB)", "growth_mib")
    row("streams cut short, latency runs", None,
        text=lambda f: "%d of %d" % (f["cut"], f["latency_streams"]) if "cut" in f else "-")
    table(["figure"] + [NAMES[n] for n in cols] + ["%s/Q-Lite" % NAMES[n] for n in others],
          rows)
    print()
    print("medians over %d interleaved rounds; token latency: 10 streams x 300 tokens 2 ms apart,"
          " NDJSON on /api/generate, SSE on /v1/chat/completions;" % rounds)
    print("memory: resident, all processes of a target, on a fresh instance after its first "
          "stream; 'never': no close within %.0f s;" % HOLD_LIMIT)
    print("a ratio is the peer's figure divided by Q-Lite's; %s" % ", ".join(
        versions(cols)))
    print("Python %s; %s" % (sys.version.split()[0], machine()))


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
            model = found.group(1).strip() if found else ""
    except OSError:
        pass
    return "%s, %d cores" % (model or os.uname().machine, os.cpu_count())


if __name__ == "__main__":
    main()

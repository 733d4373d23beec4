#!/usr/bin/env python3
"""Benchmark Q-Lite side by side with a direct connection to Ollama and with nginx.

Standard library only. The fake Ollama of test_qlite.py runs in its own process and serves all
three targets in the same run: direct (the fake itself), Q-Lite (--quiet) and nginx (configured
as people do for Ollama: proxy_http_version 1.1, proxy_buffering off, an upstream keepalive
pool, access log off, one worker). Rounds are interleaved, in a shuffled order, so that drift of
the machine hits all targets alike; each figure is the median over rounds.

    python3 bench/bench_qlite.py [--rounds 7] [--json FILE]
"""

import argparse, json, os, random, re, selectors, socket, statistics, subprocess, sys
import tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QLITE = os.path.join(ROOT, "qlite.py")
FAKE = os.path.join(ROOT, "test_qlite.py")
sys.path.insert(0, ROOT)
from test_qlite import NGINX_PROLOGUE, find_nginx, free_port  # noqa: E402
TICKS = os.sysconf("SC_CLK_TCK")

NGINX_CONF = NGINX_PROLOGUE + """
    upstream ollama {
        server 127.0.0.1:%(upstream)d;
        keepalive 32;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:%(port)d;
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
    """Something to measure: its port and the processes whose CPU it spends."""

    def __init__(self, name, port, procs=()):
        self.name, self.port, self.procs = name, port, list(procs)

    def pids(self):
        pids = [p.pid for p in self.procs]
        return pids + [c for p in pids for c in children(p)]

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(10)


def start_fake():
    p = subprocess.Popen([sys.executable, FAKE, "--fake-ollama"], stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline().split()[-1])
    return Target("direct", port, [p])


def start_qlite(upstream, *extra):
    port = free_port()
    p = subprocess.Popen([sys.executable, QLITE, "--host", "127.0.0.1", "--port", str(port),
                          "--upstream", "127.0.0.1:%d" % upstream, "--quiet"] + list(extra),
                         stderr=subprocess.DEVNULL)
    wait_accepting(port)
    return Target("qlite", port, [p])


def start_nginx(upstream):
    nginx = find_nginx()
    if not nginx:
        return None
    folder = tempfile.mkdtemp(prefix="qlite-bench-nginx-")
    os.chmod(folder, 0o777)
    port = free_port()
    conf = os.path.join(folder, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF % {"dir": folder, "port": port, "upstream": upstream})
    p = subprocess.Popen([nginx, "-p", folder, "-c", conf, "-g", "daemon off;"])
    wait_accepting(port)
    return Target("nginx", port, [p])


# ============================================================================ measurements

def post(sock, port, path, obj):
    body = json.dumps(obj).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), port, len(body), body))


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


STAMP = re.compile(rb'"t":([0-9.]+)')


def token_latency(target, streams=10, tokens=300, interval=0.002):
    """Seconds from the upstream's send to the client's parse, over every token of every stream."""
    sel = selectors.DefaultSelector()
    for _ in range(streams):
        s = socket.create_connection(("127.0.0.1", target.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        post(s, target.port, "/api/generate", {"n": tokens, "delay": interval, "stamp": True})
        sel.register(s, selectors.EVENT_READ, [b""])
    latencies = []
    while sel.get_map():
        for key, _ in sel.select(30):
            data = key.fileobj.recv(65536)
            now = time.monotonic()
            buf = key.data[0] + data
            cut = buf.rfind(b"\n") + 1
            latencies.extend(now - float(t) for t in STAMP.findall(buf, 0, cut))
            key.data[0] = buf[cut:]
            if not data or buf.endswith(b"0\r\n\r\n"):
                sel.unregister(key.fileobj)
                key.fileobj.close()
    if len(latencies) != streams * tokens:
        raise RuntimeError("%s: %d tokens, expected %d" % (target.name, len(latencies),
                                                            streams * tokens))
    return percentile(latencies, 50), percentile(latencies, 99)


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


def memory_and_startup(upstream, runs=5):
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
        p = subprocess.Popen([sys.executable, QLITE, "--host", "127.0.0.1", "--port", str(port),
                              "--upstream", "127.0.0.1:%d" % upstream, "--quiet"],
                             stderr=subprocess.DEVNULL)
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
        p.terminate()
        p.wait()
    med = statistics.median
    return {"bare_rss_kib": med(bare_rss), "qlite_rss_kib": med(start_rss),
            "kib_per_idle_connection": med(per_conn), "startup_s": med(startup)}


# ============================================================================ report

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()

    fake = start_fake()
    targets = [fake, start_qlite(fake.port)]
    nginx = start_nginx(fake.port)
    if nginx:
        targets.append(nginx)
    else:
        print("nginx is not installed (apt-get install nginx-light): measuring direct and Q-Lite")
    results = {t.name: {"token_p50": [], "token_p99": [], "bulk_lps": [], "bulk_cpu_s": [],
                        "bulk_lines": [], "small_p50": [], "small_p99": []} for t in targets}
    try:
        for target in targets:  # warm every path once
            small_requests(target, 100)
            bulk_throughput(target, 20000)
        for r in range(args.rounds):
            order = targets[:]
            random.shuffle(order)
            for target in order:
                res = results[target.name]
                p50, p99 = token_latency(target)
                res["token_p50"].append(p50)
                res["token_p99"].append(p99)
                lps, cpu, lines = bulk_throughput(target)
                res["bulk_lps"].append(lps)
                res["bulk_cpu_s"].append(cpu)
                res["bulk_lines"].append(lines)
                p50, p99 = small_requests(target)
                res["small_p50"].append(p50)
                res["small_p99"].append(p99)
            print("round %d/%d done" % (r + 1, args.rounds), file=sys.stderr)
        memory = memory_and_startup(fake.port)
    finally:
        for t in targets:
            t.stop()
    figures = {}
    for name, res in results.items():
        cpu, lines = res.pop("bulk_cpu_s"), res.pop("bulk_lines")
        figures[name] = {k: statistics.median(v) for k, v in res.items()}
        # CPU is read in clock ticks (10 ms): per line it is the total over all rounds
        figures[name]["bulk_cpu_us"] = sum(cpu) * 1e6 / sum(lines) if cpu[0] is not None else None
    figures["memory"] = memory
    report(figures, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


def report(fig, rounds):
    q, d, n = fig["qlite"], fig["direct"], fig.get("nginx")
    rows = []

    def row(label, key, scale, unit, target_text, check):
        qv, dv, nv = q[key], d[key], n[key] if n else None
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
    row("token latency p50", "token_p50", 1e6, "us", "<= 1.3x nginx", lambda v, r: r <= 1.3)
    row("token latency p99", "token_p99", 1e6, "us", "<= 1.5x nginx", lambda v, r: r <= 1.5)
    row("bulk throughput", "bulk_lps", 1, "lines/s", ">= 0.9x nginx", lambda v, r: r >= 0.9)
    row("gateway CPU per line", "bulk_cpu_us", 1, "us", "<= 1.5 us", lambda v, r: v <= 1.5)
    row("small request p50", "small_p50", 1e6, "us", "<= 2x nginx", lambda v, r: r <= 2.0)
    row("small request p99", "small_p99", 1e6, "us", "(no target)", lambda v, r: None)
    m = fig["memory"]
    header = ("figure", "direct", "Q-Lite", "nginx", "Q-Lite/nginx", "Q-Lite/direct", "target", "met")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    print()
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
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
    print("medians over %d interleaved rounds; Python %s; %s" % (
        rounds, sys.version.split()[0], machine()))


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

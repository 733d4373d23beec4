#!/usr/bin/env python3
"""Instructions Q-Lite spends per token event and per small request, counted by callgrind.

Standard library only, plus valgrind (`apt-get install -y valgrind` when missing). The fake
Ollama of the benchmark runs natively; qlite.py runs under `valgrind --tool=callgrind`. After a
warm-up, the counters are zeroed, a generation of SHORT tokens is streamed and the counters
dumped; then the same for LONG tokens. Each token leaves the fake as its own chunk, DELAY apart,
so each is one event in the gateway. The per-token figure is the difference of the two counts
over the extra tokens, so start-up and the fixed cost of a request drop out. The same is done
for `GET /api/version` on a kept-alive connection (SHORT and LONG requests). Callgrind counts
instructions, not time: the figures do not depend on what else the machine is doing.

    python3 bench/instructions.py [--qlite PATH] [--json FILE]
"""

import argparse, json, os, re, shutil, socket, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
QLITE = os.path.join(os.path.dirname(HERE), "qlite.py")
FAKE = os.path.join(HERE, "bench_fake.py")
SHORT, LONG, DELAY = 100, 600, 0.005


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_line(proc, pattern, timeout):
    """The first line of proc's stderr that matches pattern (the process must print it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if re.search(pattern, line):
            return line
        if not line and proc.poll() is not None:
            break
    raise RuntimeError("no line matching %r" % pattern)


def exchange(port, request, end):
    """Send request on a new connection and read until the response ends with end."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(request)
        got = b""
        while not got.endswith(end):
            data = s.recv(65536)
            if not data:
                raise RuntimeError("connection closed early: %r" % got[-200:])
            got += data
        return got


def generate(port, tokens):
    body = json.dumps({"n": tokens, "delay": DELAY}).encode()
    got = exchange(port, b"POST /api/generate HTTP/1.1\r\nHost: q\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(body), body), b"\r\n0\r\n\r\n")
    if got.count(b'"response"') != tokens + 1:
        raise RuntimeError("expected %d lines" % (tokens + 1))


def versions(port, count):
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        for _ in range(count):
            s.sendall(b"GET /api/version HTTP/1.1\r\nHost: q\r\n\r\n")
            got = b""
            while not got.endswith(b"}"):
                data = s.recv(65536)
                if not data:
                    raise RuntimeError("connection closed early")
                got += data


class Counted:
    """qlite.py under callgrind; measure(work) gives the instructions work made it run."""

    def __init__(self, qlite, upstream, folder):
        self.port, self.out = free_port(), os.path.join(folder, "callgrind.out")
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + self.out,
             os.path.realpath(sys.executable), qlite, "--quiet", "--host", "127.0.0.1",
             "--port", str(self.port), "--upstream", "http://127.0.0.1:%d" % upstream],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        wait_line(self.proc, r"listening on", 120)
        self.dumps = 0

    def control(self, flag):
        subprocess.run(["callgrind_control", flag, str(self.proc.pid)], check=True,
                       capture_output=True, timeout=60)

    def measure(self, work):
        self.control("-z")
        work()
        self.control("-d")
        self.dumps += 1
        with open("%s.%d" % (self.out, self.dumps)) as f:
            return int(re.search(r"^summary: (\d+)", f.read(), re.M).group(1))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qlite", default=QLITE, help="the qlite.py to measure")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        sys.exit("instructions: valgrind is not installed (apt-get install -y valgrind)")
    fake = subprocess.Popen([sys.executable, FAKE, "0"], stdout=subprocess.PIPE, text=True)
    upstream = int(fake.stdout.readline().split()[-1])
    folder = tempfile.mkdtemp(prefix="qlite-callgrind-")
    counted = Counted(os.path.abspath(args.qlite), upstream, folder)
    try:
        generate(counted.port, 20)  # warm up: imports, regex caches, first allocations
        versions(counted.port, 20)
        short = counted.measure(lambda: generate(counted.port, SHORT))
        long = counted.measure(lambda: generate(counted.port, LONG))
        per_token = (long - short) / (LONG - SHORT)
        short = counted.measure(lambda: versions(counted.port, SHORT))
        long = counted.measure(lambda: versions(counted.port, LONG))
        per_request = (long - short) / (LONG - SHORT)
    finally:
        counted.stop()
        fake.terminate()
        fake.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    figures = {"instructions_per_token_event": round(per_token),
               "instructions_per_small_request": round(per_request), "qlite": args.qlite,
               "python": "%d.%d.%d" % sys.version_info[:3]}
    print("instructions per token event (NDJSON, one line per chunk): %s" % format(
        round(per_token), ","))
    print("instructions per small request (GET /api/version, kept alive): %s" % format(
        round(per_request), ","))
    print("%s; Python %s; counted by callgrind" % (args.qlite, figures["python"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()

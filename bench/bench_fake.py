#!/usr/bin/env python3
"""The fake Ollama of test_qlite.py, with what the benchmark needs on top, in its own process.

Everything the base fake does is left as it is; on top of it:
- the script of a request (n, delay, hold, fail, pad...) may also come as a JSON object in the
  content of the last chat message, so that it survives a gateway that rebuilds the request
  body (LiteLLM sends its own body to /api/chat and keeps only the messages);
- `"stamp_content": true` stamps each token inside its text, `tokN@<time.monotonic()>` written
  as the bytes leave, because a gateway that re-encodes the stream (LiteLLM) drops the `"t"`
  field the base fake stamps;
- `"tag": "..."` records when the fake sees the gateway close the connection (a thread per
  tagged request waits for the FIN), and `"hold_limit": S` bounds how long the fake waits on a
  held or silent request;
- `GET /bench/state` answers how many generations are running, and the start and close times
  of tagged requests, for the benchmark to read.

    python3 bench/bench_fake.py [PORT]      # prints "fake ollama on PORT"; SIGTERM stops it
"""

import json, os, select, signal, sys, threading, time, types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# test_qlite imports qlite.py for its unit tests. The fake does not use it, and the benchmark may
# measure another copy of qlite.py while this one is being edited: give the import an empty module.
sys.modules.setdefault("qlite", types.ModuleType("qlite"))
import test_qlite  # noqa: E402

PLACEHOLDER = b"#" * 20     # the width of "%020.9f" % time.monotonic(), so chunk sizes hold


# ============================================================================ helpers

class StampingSocket:
    """A socket whose sendall writes the current time.monotonic() over every placeholder."""

    def __init__(self, sock):
        self.sock = sock

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def sendall(self, data):
        if PLACEHOLDER in data:
            data = data.replace(PLACEHOLDER, b"%020.9f" % time.monotonic())
        self.sock.sendall(data)


def script_of(opts):
    """The JSON object in the content of the last chat message, or {}."""
    try:
        script = json.loads(opts["messages"][-1]["content"])
    except (KeyError, IndexError, TypeError, ValueError):
        return {}
    return script if isinstance(script, dict) else {}


# ============================================================================ the fake

class BenchFake(test_qlite.FakeOllama):
    """FakeOllama plus scripts in messages, stamps in token text, close times of tagged requests."""

    def __init__(self, port=0):
        self.local = threading.local()
        self.active = 0         # generations running
        self.started = {}       # tag: time.monotonic() when the request reached the fake
        self.closed = {}        # tag: time.monotonic() when the fake saw the connection close
        super().__init__(port)

    def respond(self, conn, req):
        if req["path"] == "/bench/state":
            with self.lock:
                state = {"active": self.active, "started": dict(self.started),
                         "closed": dict(self.closed)}
            return self.send_json(conn, 200, state)
        return super().respond(conn, req)

    def generate(self, conn, path, opts):
        opts.update(script_of(opts))
        tag = opts.get("tag")
        self.local.limit = float(opts.get("hold_limit", 60.0))
        with self.lock:
            self.active += 1
            if tag:
                self.started[tag] = time.monotonic()
        stop_watch = self.watch(conn, tag) if tag else None
        try:
            if opts.get("stamp_content"):
                conn = StampingSocket(conn)
            return super().generate(conn, path, opts)
        finally:
            if stop_watch:
                stop_watch()
            with self.lock:
                self.active -= 1

    def wait_peer(self, conn, timeout=60.0):
        return super().wait_peer(conn, min(timeout, getattr(self.local, "limit", timeout)))

    def records(self, path, opts, n):
        out = super().records(path, opts, n)
        if opts.get("stamp_content"):
            out = [r.replace(b'"tok%d' % i, b'"tok%d@%s' % (i, PLACEHOLDER), 1) if i < n else r
                   for i, r in enumerate(out)]
        return out

    def watch(self, conn, tag):
        """Note when the peer closes conn (FIN or reset); return a function that stops watching."""
        fd = os.dup(conn.fileno())  # our own descriptor: conn may be closed and its number reused
        wake_r, wake_w = os.pipe()

        def run():
            poller = select.poll()
            poller.register(fd, select.POLLRDHUP)  # POLLHUP and POLLERR come with it
            poller.register(wake_r, select.POLLIN)
            for got, _ in poller.poll():
                if got == fd:
                    with self.lock:
                        self.closed.setdefault(tag, time.monotonic())

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def stop():
            os.write(wake_w, b"x")
            thread.join()
            for f in (fd, wake_r, wake_w):
                os.close(f)
        return stop


def main():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    fake = BenchFake(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print("fake ollama on %d" % fake.port, flush=True)
    try:
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        fake.stop()


if __name__ == "__main__":
    main()

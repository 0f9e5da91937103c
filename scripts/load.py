#!/usr/bin/env python3
"""A rough end-to-end load: registers N jobs against running jobhook instances (round-robin) and counts
the callbacks on a receiver of its own. Standard library only; Python's own overhead caps what it can
show, so read its figures as lower bounds. (The benchmark of record is issue 5's.)

  python3 scripts/load.py --api http://127.0.0.1:8080 [--api …] --key KEY --jobs 5000 --concurrency 32 --port 8099
The instances must run with JOBHOOK_ALLOW_PRIVATE_CALLBACKS=true; the upstream should end jobs at once.
"""
import argparse, http.client, json, threading, time, urllib.parse, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--api", action="append", required=True)
p.add_argument("--key", required=True)
p.add_argument("--jobs", type=int, default=5000)
p.add_argument("--concurrency", type=int, default=32)
p.add_argument("--port", type=int, default=8099)
a = p.parse_args()

received, lock, done = set(), threading.Lock(), threading.Event()
last = [0.0]

class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with lock:
            received.add(json.loads(body)["job_id"])
            last[0] = time.monotonic()
            if len(received) >= a.jobs:
                done.set()
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", a.port), Receiver)
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()

jobs = [str(uuid.uuid4()) for _ in range(a.jobs)]
latencies, errors = [], [0]
def worker(n):
    conns = {}
    for i in range(n, a.jobs, a.concurrency):
        base = urllib.parse.urlsplit(a.api[i % len(a.api)])
        conn = conns.get(base.netloc) or http.client.HTTPConnection(base.netloc, timeout=30)
        conns[base.netloc] = conn
        body = json.dumps({"job_id": jobs[i], "callback_url": f"http://127.0.0.1:{a.port}/hook"})
        t = time.monotonic()
        conn.request("POST", "/v1/subscriptions", body, {"Authorization": f"Bearer {a.key}", "content-type": "application/json"})
        r = conn.getresponse(); r.read()
        with lock:
            latencies.append(time.monotonic() - t)
            if r.status != 201:
                errors[0] += 1

start = time.monotonic()
threads = [threading.Thread(target=worker, args=(n,)) for n in range(a.concurrency)]
for t in threads: t.start()
for t in threads: t.join()
registered = time.monotonic() - start
done.wait(120)
total = last[0] - start
latencies.sort()
pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
print(f"instances {len(a.api)}  jobs {a.jobs}  concurrency {a.concurrency}  non-201 {errors[0]}  delivered {len(received)}")
print(f"registration: {a.jobs / registered:,.0f}/s  p50 {pct(0.5):.1f} ms  p99 {pct(0.99):.1f} ms")
print(f"end to end:   {len(received) / total:,.0f} jobs/s (first registration to last callback, {total:.1f} s)")

#!/usr/bin/env python
"""Benchmark `seqgen serve`: a bounded load test on 127.0.0.1 against offline decoding of the same inputs.

    python scripts/bench_serve.py --data-dir ../shared/data          # shipped models, 1 / 8 / 32 clients
    python scripts/bench_serve.py --data-dir ../shared/data --clients 32 --requests 400

Starts `seqgen serve multi30k-de-en flickr8k-captioner` in a subprocess on a free loopback port, then for each
client count sends a fixed number of requests (Multi30k test_2016_flickr sentences, one per request, beam 5;
Flickr8k test photos as multipart uploads, beam 5), each client waiting for its answer before sending the next
(closed loop), and stops. Prints requests/s, p50/p95/p99 latency, errors and the server's RSS before and after,
and the offline rates of `translate` / `caption_images` on the same inputs in this machine's same run.
Run it alone on the machine: the server and the clients share its cores.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

from seqgen.bench import print_rows, process_memory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    return process_memory(pid).get("rss", float("nan"))


def multipart(data: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
                 f'Content-Type: image/jpeg\r\n\r\n'.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def server_health(port: int) -> dict:
    """The server's /health answer (its batcher's counters: searches, items, busy_s)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", "/health")
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def load(port: int, clients: int, requests: list[tuple[str, bytes, str]], seconds_cap: float) -> dict:
    """Send `requests` (path, body, content type) from `clients` threads, closed loop; latencies in ms."""
    latencies, errors, lock = [], [], threading.Lock()
    next_i = [0]
    deadline = time.monotonic() + seconds_cap

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < deadline:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= len(requests):
                break
            path, body, ctype = requests[i]
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException) as e:
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                r = e
            with lock:
                (latencies if ok else errors).append((time.perf_counter() - t0) * 1000 if ok else str(r))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else float("nan")

    return {"done": len(lat), "errors": len(errors), "rps": len(lat) / wall, "wall": wall, "p50": pct(50),
            "p95": pct(95),
            "p99": pct(99), "first_error": errors[0] if errors else ""}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--data-dir", default=os.environ.get("SEQGEN_DATA", os.path.join("..", "shared", "data")))
    p.add_argument("--translator", default="multi30k-de-en")
    p.add_argument("--captioner", default="flickr8k-captioner")
    p.add_argument("--clients", default="1,8,32", help="comma-separated client counts (default: 1,8,32)")
    p.add_argument("--requests", type=int, default=640, help="translation requests per client count (default: 640)")
    p.add_argument("--images", type=int, default=96, help="caption requests per client count")
    p.add_argument("--seconds", type=float, default=120.0, help="cap per load run (default: 120)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=50.0)
    p.add_argument("--quiet-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=0, help="the server's decoding threads (default: torch's choice)")
    args = p.parse_args()
    d = args.data_dir
    sentences = open(os.path.join(d, "multi30k", "test_2016_flickr.de"), encoding="utf-8").read().splitlines()
    names = open(os.path.join(d, "flickr8k", "test.txt"), encoding="utf-8").read().split()
    photos = [open(os.path.join(d, "flickr8k", "images", n), "rb").read() for n in names[:args.images]]
    port = free_port()
    cmd = [sys.executable, "-m", "seqgen.cli", "serve", args.translator, args.captioner, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--quiet-ms", str(args.quiet_ms),
           "--max-queue", "4096", "--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print("bench_serve: error: the server did not start: " + (server.stderr.read() or "")[-500:],
                      file=sys.stderr)
                return 2
            time.sleep(0.2)
        rows = [("server", " ".join(cmd[2:])), ("server RSS at start", f"{rss_mb(server.pid):.0f} MB")]
        tr = [("/v1/translate", json.dumps({"text": s, "beam": 5}).encode(), "application/json") for s in sentences]
        cap = [("/v1/caption", *multipart(ph, {"beam": "5"})) for ph in photos]
        # warm-up: a few requests of each kind
        load(port, 4, tr[:8] + cap[:4], 60)
        results = {}
        for clients in [int(c) for c in args.clients.split(",")]:
            for what, reqs in (("translate", tr[:args.requests]), ("caption", cap)):
                before = server_health(port)
                r = load(port, clients, reqs, args.seconds)
                after = server_health(port)
                results[(what, clients)] = r
                searches = after["searches"] - before["searches"]
                rows.append((f"{what}, {clients} clients ({r['done']} requests)",
                             f"{r['rps']:.1f} req/s, p50 {r['p50']:.0f} / p95 {r['p95']:.0f} / p99 {r['p99']:.0f} ms, "
                             f"errors {r['errors']}" + (f" ({r['first_error'][:80]})" if r["errors"] else "")))
                busy = 100 * (after["busy_s"] - before["busy_s"]) / r["wall"]
                rows.append(("  its searches",
                             f"{searches:,}, mean batch {(after['items'] - before['items']) / max(1, searches):.1f}; "
                             f"the decoding thread searched {busy:.0f}% of the run's {r['wall']:.1f} s"))
        rows.append(("server RSS at the end", f"{rss_mb(server.pid):.0f} MB"))
        health = server_health(port)
        rows.append(("batched searches / requests decoded",
                     f"{health['searches']:,} / {health['items']:,} (mean batch {health['items'] / max(1, health['searches']):.1f})"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    # offline, in this process, on the same inputs, after the server is gone
    from seqgen.allocator import tune_cpu_allocator
    tune_cpu_allocator()
    from seqgen.generation import GenerationConfig
    from seqgen.model import load_model
    from seqgen.inference.captioning import caption_images, default_caption_gen
    from seqgen.inference.translation import translate
    model = load_model(args.translator, task="translation")
    translate(model, sentences[:16], GenerationConfig(beam=5))
    t0 = time.perf_counter()
    translate(model, sentences[:args.requests], GenerationConfig(beam=5), batch_size=64)
    offline_tr = args.requests / (time.perf_counter() - t0)
    captioner = load_model(args.captioner, task="captioning")
    files = [os.path.join(d, "flickr8k", "images", n) for n in names[:args.images]]
    caption_images(captioner, files[:8], default_caption_gen())
    t0 = time.perf_counter()
    caption_images(captioner, files, default_caption_gen(), batch_size=64)
    offline_cap = len(files) / (time.perf_counter() - t0)
    rows.append(("offline translate (batch 64, beam 5)", f"{offline_tr:.1f} sentences/s"))
    rows.append(("offline caption_images (batch 64, beam 5)", f"{offline_cap:.1f} images/s"))
    most = max(int(c) for c in args.clients.split(","))
    rows.append((f"served / offline translation at {most} clients",
                 f"{100 * results[('translate', most)]['rps'] / offline_tr:.0f}% (target >= 80%)"))
    rows.append((f"served / offline captioning at {most} clients",
                 f"{100 * results[('caption', most)]['rps'] / offline_cap:.0f}%"))
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

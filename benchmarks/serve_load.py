"""`sdonnx serve` under load: throughput and latency of one process and of Ray Serve with 1 and 2
replicas, side by side in one run, then a soak test of the single process's memory.

    python benchmarks/serve_load.py [--clients 64] [--duration 60] [--steps 20] [--soak 200]
                                    [--out benchmarks/results/serve-embedded]

Each system is started as a user starts it (`sdonnx serve ...` in its own process) on the embedded
model, 2 cores in all: "process" (one process, 2 threads, --max-queue 8), "ray-1x2" (one Ray replica
of 2 threads) and "ray-2x1" (two replicas of 1 thread; Ray's queue holds 8). `--clients` closed-loop
clients each send txt2img requests (64x64, --steps Euler steps, seed fixed) for --duration seconds;
a 429/503 is answered by sleeping its Retry-After (1 s without one) and retrying, as a polite
client would. Reported per system: images per minute (200s), p50/p95 latency of the 200s (send to
answer), how many 429/503 the clients saw, and any other status (there must be none).

The soak: --soak requests, one after another, to a fresh single process; its resident set
(VmRSS) is read every 10 requests, and the growth from request 20 (warm) to the last is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from common import machine  # noqa: E402 (benchmarks/ is the script's folder)

PROMPT = "a red circle on a blue background"
SYSTEMS = {
    "process": ["--threads", "2", "--max-queue", "8"],
    "ray-1x2": ["--ray", "--replicas", "1", "--threads", "2", "--max-queue", "8"],
    "ray-2x1": ["--ray", "--replicas", "2", "--threads", "1", "--max-queue", "8"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`sdonnx serve FLAGS` in its own process group, ready once /health answers."""

    def __init__(self, flags: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "sdonnx", "serve", "--port", str(self.port), *flags],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 180
        while not self._healthy():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"sdonnx serve {' '.join(flags)} did not start")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        """SIGTERM to the server (it shuts its Ray down), then SIGKILL to whatever of its group is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def load(url: str, clients: int, duration: float, steps: int) -> dict:
    """`clients` closed-loop clients for `duration` s; per-status counts and the 200s' latencies."""
    body = {"prompt": PROMPT, "steps": steps, "sampler_name": "Euler", "seed": 1, "width": 64, "height": 64}
    stop_at = time.monotonic() + duration
    latencies: list[float] = []
    codes: Counter = Counter()
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                r = session.post(url + "/sdapi/v1/txt2img", json=body, timeout=300)
                code = r.status_code
            except requests.RequestException as e:
                code = type(e).__name__
            elapsed = time.monotonic() - started
            with lock:
                codes[code] += 1
                if code == 200:
                    latencies.append(elapsed)
            if code in (429, 503):
                time.sleep(min(float(r.headers.get("Retry-After", 1)), 2))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - began
    latencies.sort()
    return {
        "images_per_min": 60 * len(latencies) / wall, "ok": len(latencies), "wall_s": wall,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
        "codes": {str(k): v for k, v in sorted(codes.items(), key=str)},
    }


def soak(requests_count: int, steps: int) -> dict:
    server = Server(SYSTEMS["process"])
    try:
        body = {"prompt": PROMPT, "steps": steps, "sampler_name": "Euler", "width": 64, "height": 64}
        samples, failures = [], 0
        with requests.Session() as session:
            for i in range(1, requests_count + 1):
                body["seed"] = i  # a new image each time: nothing is cached
                failures += session.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=300).status_code != 200
                if i % 10 == 0:
                    samples.append((i, server.rss_mb()))
        warm = next(rss for i, rss in samples if i >= 20)
        return {"requests": requests_count, "failures": failures, "rss_mb": samples,
                "growth_mb_after_warmup": samples[-1][1] - warm, "max_mb": max(r for _, r in samples)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--soak", type=int, default=200)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    results: dict = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "systems": {}}
    for name in args.systems.split(","):
        server = Server(SYSTEMS[name])
        try:
            load(server.url, 4, 5, args.steps)  # warm-up: sessions' first runs, Ray's routing
            results["systems"][name] = load(server.url, args.clients, args.duration, args.steps)
        finally:
            server.stop()
        print(name, json.dumps(results["systems"][name]), flush=True)
    if args.soak:
        results["soak"] = soak(args.soak, args.steps)
        print("soak", json.dumps(results["soak"]), flush=True)
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        args.out.with_suffix(".md").write_text(report(results, args))


def report(results: dict, args: argparse.Namespace) -> str:
    lines = [f"# sdonnx serve under load ({args.clients} clients, {args.duration:g} s each, {args.steps} steps, "
             "embedded model, 64x64)", "", f"Machine: {results['machine']}", "", f"Command: `{results['command']}`",
             "", "| system | images/min | p50 latency (s) | p95 latency (s) | 200 | 429 | 503 | other |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["systems"].items():
        codes = dict(r["codes"])
        other = sum(v for k, v in codes.items() if k not in ("200", "429", "503"))
        lines.append(f"| {name} | {r['images_per_min']:.0f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                     f"{codes.get('200', 0)} | {codes.get('429', 0)} | {codes.get('503', 0)} | {other} |")
    if "soak" in results:
        s = results["soak"]
        lines += ["", f"Soak: {s['requests']} requests one after another to one process, {s['failures']} failed; "
                  f"RSS {s['rss_mb'][0][1]:.0f} MB at request 10, {s['rss_mb'][-1][1]:.0f} MB at the last, "
                  f"max {s['max_mb']:.0f} MB; growth after request 20: {s['growth_mb_after_warmup']:+.1f} MB.",
                  "", "RSS (MB) every 10 requests: " + ", ".join(f"{rss:.0f}" for _, rss in s["rss_mb"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

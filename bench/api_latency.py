#!/usr/bin/env python3
"""Per-request latency of gpupass's agent API over its unix socket, from one persistent
HTTP/1.1 connection per request (what curl or a client library does), N times per endpoint.

    bench/api_latency.py SOCKET N  ->  one line per case: name, median, p90, p99 (milliseconds)
"""
import http.client
import json
import socket
import statistics
import sys
import time


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("gpupass")
        self.path_ = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path_)
        self.sock = s


def once(sock, method, path, body=None):
    c = UnixConnection(sock)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    t0 = time.perf_counter()
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    dt = (time.perf_counter() - t0) * 1000
    c.close()
    return r.status, data, dt


def case(sock, n, name, method, path, body=None, want=200):
    times = []
    for _ in range(n):
        status, data, dt = once(sock, method, path, body)
        if status != want:
            sys.exit(f"{name}: HTTP {status}, wanted {want}: {data[:200]!r}")
        times.append(dt)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
    print(f"{name}\t{statistics.median(times):.2f}\t{q(0.90):.2f}\t{q(0.99):.2f}")


def main():
    sock, n = sys.argv[1], int(sys.argv[2])
    dom = sys.argv[3] if len(sys.argv) > 3 else "gpupass-bench-0"
    case(sock, n, "GET /v1/health", "GET", "/v1/health")
    case(sock, n, "GET /v1/gpus (list --json)", "GET", "/v1/gpus")
    case(sock, n, "GET /v1/domains", "GET", "/v1/domains")
    case(sock, n, "GET /metrics", "GET", "/metrics")
    # An attach decision that refuses: the whole path (discovery, libvirt connection, host lock,
    # domain XML, plan) without a device change.
    case(sock, n, "POST attach --count 9 (refused: 8 free)", "POST",
         f"/v1/domains/{dom}/attach", json.dumps({"count": 9, "config": True}), want=409)
    # Attach one GPU to the persistent definition and detach it again: two libvirt changes,
    # each verified by re-reading the domain XML.
    att, det = [], []
    for _ in range(max(1, n // 4)):
        s, d, t = once(sock, "POST", f"/v1/domains/{dom}/attach",
                       json.dumps({"gpus": ["0000:18:00.0"], "config": True}))
        if s != 200:
            sys.exit(f"attach: HTTP {s}: {d[:200]!r}")
        att.append(t)
        s, d, t = once(sock, "POST", f"/v1/domains/{dom}/detach",
                       json.dumps({"gpus": ["0000:18:00.0"], "config": True}))
        if s != 200:
            sys.exit(f"detach: HTTP {s}: {d[:200]!r}")
        det.append(t)
    for name, ts in (("POST attach --gpu --config", att), ("POST detach --gpu --config", det)):
        ts.sort()
        print(f"{name}\t{statistics.median(ts):.2f}\t{ts[int(0.9 * (len(ts) - 1))]:.2f}\t{ts[-1]:.2f}")


if __name__ == "__main__":
    main()

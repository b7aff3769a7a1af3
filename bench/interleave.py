#!/usr/bin/env python3
"""Whole-process times of shell commands run in turn (A B C A B C …), so that load from other
processes on a shared machine falls on every command alike; prints medians and the ratio of
each to the first command (the floor). Each command runs as `sh -c CMD` with stdout discarded.

Usage: bench/interleave.py RUNS NAME=CMD [NAME=CMD …] [--json FILE]
"""
import json
import os
import statistics
import sys
import time


def run_once(cmd: str) -> float:
    devnull = os.open(os.devnull, os.O_WRONLY)
    start = time.perf_counter()
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", cmd], os.environ,
                         file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1)])
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    os.close(devnull)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"interleave: {cmd!r} failed")
    return elapsed


def main() -> None:
    args = sys.argv[1:]
    out = None
    if "--json" in args:
        i = args.index("--json")
        out = args[i + 1]
        del args[i:i + 2]
    runs = int(args[0])
    cmds = [a.split("=", 1) for a in args[1:]]
    times = {name: [] for name, _ in cmds}
    for _ in range(5):  # warm the page cache
        for _, cmd in cmds:
            run_once(cmd)
    for _ in range(runs):
        for name, cmd in cmds:
            times[name].append(run_once(cmd))
    floor = statistics.median(times[cmds[0][0]])
    rows = []
    print("| command | median [ms] | mean ± σ [ms] | min [ms] | runs | median / floor |")
    print("|:---|---:|---:|---:|---:|---:|")
    for name, cmd in cmds:
        t = times[name]
        med = statistics.median(t)
        rows.append({"command": name, "median": med, "times": t})
        print(f"| {name} | {med * 1e3:.2f} | {statistics.mean(t) * 1e3:.2f} ± "
              f"{statistics.stdev(t) * 1e3:.2f} | {min(t) * 1e3:.2f} | {len(t)} | "
              f"{med / floor:.2f}x |")
    if out:
        with open(out, "w") as f:
            json.dump({"results": rows}, f)


if __name__ == "__main__":
    main()

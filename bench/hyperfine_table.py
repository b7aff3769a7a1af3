#!/usr/bin/env python3
"""Prints hyperfine's JSON export as Markdown table rows, with long paths shortened.

    bench/hyperfine_table.py FILE.json PREFIX [STRIP…]
"""
import json
import sys

path, prefix, strip = sys.argv[1], sys.argv[2], sys.argv[3:]
for r in json.load(open(path))["results"]:
    cmd = r["command"]
    for s in strip:
        cmd = cmd.replace(s, "…")
    print(f"| {prefix}`{cmd}` | {r['mean'] * 1000:.2f} | {r['min'] * 1000:.2f} |")

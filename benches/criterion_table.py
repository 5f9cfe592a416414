#!/usr/bin/env python3
"""Print the latest criterion results as a Markdown table (for BENCHMARKS.md).

Usage: python3 benches/criterion_table.py [CRITERION_DIR]
CRITERION_DIR defaults to $CARGO_TARGET_DIR/criterion, else target/criterion.
Reads every <group>/<bench>/new/estimates.json (and benchmark.json for the throughput).
"""
import json
import os
import sys
from pathlib import Path


def fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.1f} ns"


def main() -> None:
    if len(sys.argv) > 1:
        root = Path(sys.argv[1])
    else:
        root = Path(os.environ.get("CARGO_TARGET_DIR", "target")) / "criterion"
    rows = []
    for est in sorted(root.glob("**/new/estimates.json")):
        bench_dir = est.parent
        meta_path = bench_dir / "benchmark.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        data = json.loads(est.read_text())
        median = data["median"]["point_estimate"]
        lo = data["median"]["confidence_interval"]["lower_bound"]
        hi = data["median"]["confidence_interval"]["upper_bound"]
        name = meta.get("full_id") or str(bench_dir.parent.relative_to(root))
        per_elem = ""
        tp = meta.get("throughput") or {}
        if "Elements" in tp and tp["Elements"]:
            per_elem = fmt_ns(median / tp["Elements"]) + " / element"
        rows.append((name, fmt_ns(median), f"{fmt_ns(lo)} – {fmt_ns(hi)}", per_elem))
    print("| bench | median | 95% CI of median | per element |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()

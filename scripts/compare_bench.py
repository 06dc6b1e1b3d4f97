"""Compare a bench JSON with a committed one, figure by figure: which values are identical and which moved.

    python scripts/compare_bench.py --json OUT.json NAME=COMMITTED.json:RERUN.json [NAME=...]

Rows are matched by their identifying columns (method, task, bits, shape, variant, layers, ...). Timing columns
(seconds, ratios of times, latency, peak RSS) vary from run to run and from machine to machine; they are counted
apart and never reported as "moved". Every other column is compared exactly. The output is a bench-shaped JSON
({bench, machine, command, rows}) that scripts/make_results.py turns into a RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ("method", "task", "bits", "shape", "variant", "append_layer", "layers", "comparison")
TIMING_WORDS = ("seconds", "time", "latency", "rss", "flops_per_second", "mfu", "matmul_peak", "step_ratio", "eta")


def is_timing(column: str) -> bool:
    return any(word in column for word in TIMING_WORDS)


def row_key(row: dict) -> tuple:
    return tuple((k, row[k]) for k in KEYS if k in row)


def compare(name: str, committed: dict, rerun: dict) -> dict:
    new_rows = {row_key(r): r for r in rerun["rows"]}
    same = moved = timing = 0
    changes, missing = [], []
    for old in committed["rows"]:
        new = new_rows.get(row_key(old))
        if new is None:
            missing.append(dict(row_key(old)))
            continue
        for column, value in old.items():
            if is_timing(column):
                timing += 1
            elif new.get(column) == value:
                same += 1
            else:
                moved += 1
                changes.append(f"{'/'.join(str(v) for _, v in row_key(old))} {column}: {value} -> {new.get(column)}")
    added = [dict(k) for k in new_rows if k not in {row_key(r) for r in committed["rows"]}]
    return {"bench": name, "committed_rows": len(committed["rows"]), "rerun_rows": len(rerun["rows"]),
            "identical_values": same, "moved_values": moved, "timing_values": timing,
            "rows_missing": len(missing), "rows_added": len(added), "moved": "; ".join(changes[:12]) or None}


def main() -> None:
    from peftkit.utils.tables import machine_info

    parser = argparse.ArgumentParser()
    parser.add_argument("pairs", nargs="+", help="NAME=COMMITTED.json:RERUN.json")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = []
    for pair in args.pairs:
        name, _, files = pair.partition("=")
        committed, rerun = files.split(":")
        rows.append(compare(name, json.loads(Path(committed).read_text()), json.loads(Path(rerun).read_text())))
    payload = {"bench": "bench-reproduction", "machine": machine_info(),
               "command": " ".join(["python", "scripts/compare_bench.py", *sys.argv[1:]]), "rows": rows}
    Path(args.json).write_text(json.dumps(payload, indent=2))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()

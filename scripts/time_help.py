"""Measure how long `peftkit --help` takes (fresh interpreter each time) and save bench-format JSON.

usage: python scripts/time_help.py --json OUT.json [--repeats 10]

The committed figure is docs/results/cli-help.json; write a new run elsewhere and compare, rather than over it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    peftkit = Path(sys.executable).parent / "peftkit"
    rows = []
    for argv in ([str(peftkit), "--help"], [str(peftkit), "finetune", "--help"], [str(peftkit), "methods"]):
        subprocess.run(argv, capture_output=True, check=True)  # warm the file cache
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        rows.append({"command": " ".join(["peftkit", *argv[1:]]), "median_seconds": round(statistics.median(times), 3),
                     "max_seconds": round(max(times), 3), "repeats": args.repeats})
    from peftkit.bench.harness import format_table, machine_info

    payload = {"bench": "cli-help", "title": "CLI start-up",
               "machine": machine_info(), "command": "python scripts/time_help.py", "rows": rows}
    print(format_table(rows))
    Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

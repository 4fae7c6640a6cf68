"""`make bench`: run every CPU benchmark in one go, print them, write benchmarks/results.json.

Each benchmark is a script in this folder that ends by printing one JSON object; the objects are
merged (with the machine they ran on) into ``results.json``. Copy the figures into RESULTS.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["render.py", "loader.py", "inference.py", "overhead.py"]


def main() -> int:
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    failed = []
    for name in BENCHMARKS:
        script = HERE / name
        if not script.is_file():
            print(f"== {name}: not present, skipped")
            continue
        print(f"== {name}", flush=True)
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        print(proc.stdout, end="")
        lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-2000:], file=sys.stderr)
            failed.append(name)
            continue
        results.update(json.loads(lines[-1]))
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m benchmarks.cli_help: wall time of `sft-job run --help` (median of 7 fresh processes)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def main() -> None:
    times = []
    for _ in range(7):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "job.cli", "run", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    print(f"sft-job run --help: median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    main()

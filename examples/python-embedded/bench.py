"""In-process `task.call` overhead from Python, with a no-op tool.

    python3 examples/python-embedded/bench.py [--calls N] [--dir DIR]

Copies this example's configuration into DIR (default: a new temporary
folder; give a tmpfs such as /dev/shm to take the disk's fsync out of the
figure), then times, per call, with `time.perf_counter_ns`:

- `direct`: the no-op function called from Python, nothing else;
- `decide`: `task.authorize` on a gateway loaded without a ledger
  (`Gateway.load`): the crossing into Rust and the decision alone;
- `authorize`: the decision and its durable write-ahead record, no call;
- `call`: `task.call(..., invoke=noop)`: decision, write-ahead record,
  the call, and the outcome record queued into the chain.

Prints the median, p90 and p99 of each in microseconds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import portcullis

HERE = Path(__file__).resolve().parent


def quantiles(ns: list[int]) -> str:
    us = sorted(n / 1000 for n in ns)
    q = statistics.quantiles(us, n=100)
    return f"median {statistics.median(us):8.1f} µs   p90 {q[89]:8.1f} µs   p99 {q[98]:8.1f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None)
    opts = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="portcullis-bench-", dir=opts.dir))
    shutil.copy(HERE / "portcullis.toml", base / "portcullis.toml")
    shutil.copytree(HERE / "policies", base / "policies")

    def noop(args: dict[str, int]) -> None:
        return None

    rows: dict[str, list[int]] = {}
    try:
        memory = portcullis.Gateway.load(base / "portcullis.toml").start_task(
            "report-bot", goal="benchmark"
        )
        for i in range(200):
            memory.authorize("local.noop", {"n": i})
        samples = []
        for i in range(opts.calls):
            args = {"n": i}
            t0 = time.perf_counter_ns()
            memory.authorize("local.noop", args)
            samples.append(time.perf_counter_ns() - t0)
        rows["decide"] = samples
        with portcullis.Gateway.open(base / "portcullis.toml") as gw:
            task = gw.start_task("report-bot", goal="benchmark")
            for i in range(200):  # warm up: caches, the ledger file, the allocator
                task.call("local.noop", {"n": i}, invoke=noop)
            for name in ("direct", "authorize", "call"):
                samples = []
                for i in range(opts.calls):
                    args = {"n": i}
                    t0 = time.perf_counter_ns()
                    if name == "direct":
                        noop(args)
                    elif name == "authorize":
                        task.authorize("local.noop", args)
                    else:
                        task.call("local.noop", args, invoke=noop)
                    samples.append(time.perf_counter_ns() - t0)
                rows[name] = samples
        print(f"ledger: {base}   calls per row: {opts.calls}")
        for name, samples in rows.items():
            print(f"{name:>9}: {quantiles(samples)}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The test suite's wall time and CPU time at several pytest-xdist worker counts, in one run of this
script (docs/BENCHMARKS.md, "The test suite"), run as `make test` runs it: one torch thread per process
(`--threads`, OMP_NUM_THREADS) and tests/conftest.py's scheduling. The CPU time is what every process of the suite used,
Flower's detached SuperLinks, SuperNodes and ClientApps included: each suite runs in a cgroup of its
own (cgroup v1 `cpuacct`, which needs root; without it the CPU column is left empty). On N cores a
suite cannot take less wall time than its CPU time / N, whatever the worker count.

    python benchmarks/test_suite.py --workers 2 4 --out docs/benchmarks-test-suite.json
    python benchmarks/test_suite.py --repo ../old-checkout --threads 0 --label before --out F --append
    python benchmarks/test_suite.py --table docs/benchmarks-test-suite.json   # its tables; runs nothing
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recbole_ext.runs import machine_info  # noqa: E402

CPUACCT = Path("/sys/fs/cgroup/cpuacct")
DURATION = re.compile(r"^([0-9.]+)s (call|setup|teardown)\s+(tests/[^:]+)::(\S+)")


def cgroup(name: str) -> Path | None:
    """A fresh cpuacct cgroup, or None where there is none to make."""
    folder = CPUACCT / name
    try:
        folder.mkdir(exist_ok=True)
        (folder / "cpuacct.usage").write_text("0")
        return folder
    except OSError:
        return None


def suite(workers: int, args: list[str], repo: Path, threads: int, label: str) -> dict:
    group = cgroup(f"ur4rec-suite-{os.getpid()}-{workers}")
    command = [sys.executable, "-m", "pytest", "-q", "-n", str(workers), "--durations=0", "-p", "no:cacheprovider", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else \
        {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    # the shell joins the cgroup first, so pytest and everything it starts are counted
    join = f"echo $$ > {group / 'cgroup.procs'}; " if group else ""
    started = time.monotonic()
    done = subprocess.run(["sh", "-c", join + 'exec "$@"', "sh", *command], cwd=repo, env=env, capture_output=True,
                          text=True)
    wall = time.monotonic() - started
    cpu = int((group / "cpuacct.usage").read_text()) / 1e9 if group else None
    per_file, tests = defaultdict(float), {}
    for line in done.stdout.splitlines():
        if match := DURATION.match(line):
            seconds, _, path, name = match.groups()
            per_file[path] += float(seconds)
            tests[f"{path}::{name}"] = tests.get(f"{path}::{name}", 0.0) + float(seconds)
    summary = next((line for line in reversed(done.stdout.splitlines()) if " in " in line and "passed" in line), "")
    if group:
        group.rmdir()
    return {"label": label, "workers": workers, "threads": threads or None, "pytest_args": args, "exit_code": done.returncode, "summary": summary.strip("= "),
            "failed": [line.split(" - ")[0] for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))],
            "wall_seconds": round(wall, 1), "cpu_seconds": None if cpu is None else round(cpu, 1),
            "test_seconds": round(sum(per_file.values()), 1),
            "per_file_seconds": {k: round(v, 1) for k, v in sorted(per_file.items(), key=lambda kv: -kv[1])},
            "slowest": {k: round(v, 1) for k, v in sorted(tests.items(), key=lambda kv: -kv[1])[:15]}}


def threads_of(row: dict) -> str:
    return str(row["threads"]) if row["threads"] else "torch's default"


def table(record: dict) -> str:
    """The tables docs/BENCHMARKS.md shows, from a record: one row per suite, then the seconds each test
    file's tests took in each suite that ran more than the deployments (their pytest durations, summed
    over the workers)."""
    cores = record["machine"]["cores"]
    lines = [f"| code | tests | workers | torch threads | result | wall s | CPU s, all processes | CPU s / {cores} cores "
             "| test durations, summed s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        cpu = "–" if row["cpu_seconds"] is None else f"{row['cpu_seconds']:,.0f}"
        floor = "–" if row["cpu_seconds"] is None else f"{row['cpu_seconds'] / cores:,.0f}"
        selection = " ".join(row["pytest_args"]) or "all"
        lines.append(f"| {row['label']} | {selection} | {row['workers']} | {threads_of(row)} | {row['summary'].split(' in ')[0]} | "
                     f"{row['wall_seconds']:,.0f} | {cpu} | {floor} | {row['test_seconds']:,.0f} |")
    rows = [row for row in record["rows"] if len(row["per_file_seconds"]) > 1]  # not the deployments alone
    files = list(rows[0]["per_file_seconds"])[:8]

    def heading(r):
        return f"s: {r['label']}, {' '.join(r['pytest_args']) or 'all'}, -n {r['workers']}, threads: {threads_of(r)}"

    lines += ["", "| test file | " + " | ".join(heading(r) for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for name in files:
        lines.append(f"| {Path(name).name} | " + " | ".join(f"{r['per_file_seconds'].get(name, 0):,.0f}" for r in rows) + " |")
    rest = [sum(v for k, v in r["per_file_seconds"].items() if k not in files) for r in rows]
    lines.append("| the other files | " + " | ".join(f"{v:,.0f}" for v in rest) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--out", type=Path, help="write the record here (JSON)")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to the record --out holds (measured on the same machine)")
    parser.add_argument("--table", metavar="FILE.json", help="print the Markdown tables of a record; run nothing")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose suite runs (default: this one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for the suite, as make test sets it; 0: torch's default")
    parser.add_argument("--label", default="this checkout", help="what the rows measure, e.g. a commit")
    parser.add_argument("pytest_args", nargs="*", help="more arguments for pytest (after --)")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    rows = []
    for workers in args.workers:
        rows.append(suite(workers, args.pytest_args, args.repo, args.threads, args.label))
        row = rows[-1]
        print(f"-n {workers}: {row['summary']}; wall {row['wall_seconds']:.0f} s, CPU "
              f"{row['cpu_seconds'] if row['cpu_seconds'] is not None else '?'} s, "
              f"test durations {row['test_seconds']:.0f} s", flush=True)
    command = " ".join(["python", "benchmarks/test_suite.py", *(argv or sys.argv[1:])])
    record = {"machine": machine_info(), "commands": [command], "rows": rows}
    if args.append:
        earlier = json.loads(args.out.read_text())
        if earlier["machine"] != record["machine"]:
            sys.exit(f"{args.out} was measured on another machine: {earlier['machine']}")
        record = {**earlier, "commands": earlier["commands"] + [command], "rows": earlier["rows"] + rows}
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

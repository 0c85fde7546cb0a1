"""Peak resident memory of ppo.py as the budget grows: it must stay flat (no per-step metric stacks).

    python bench/memory.py --env inverted_pendulum --budgets 1000000 4000000 16000000

Each budget runs ppo.py in its own process; the peak RSS comes from that process's rusage.
"""

import dataclasses
import json
import os
import subprocess
import sys

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Bench:
    env: str = "inverted_pendulum"
    """Brax environment (a small one keeps 16M steps affordable on a CPU)."""
    budgets: tuple[int, ...] = (1_000_000, 4_000_000, 16_000_000)
    """total_timesteps of each run."""
    extra: tuple[str, ...] = ("--num-envs", "512", "--num-steps", "16", "--num-minibatches", "8",
                              "--hidden-sizes", "64", "64")  # fmt: skip
    """Further ppo.py flags, the same for every run."""
    out: str = "bench/memory.json"
    """Where to write the table as JSON."""


def peak_rss_mb(command):
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{output[-2000:]}")
    return usage.ru_maxrss / 1024, output.strip().splitlines()[-1]  # Linux reports KiB


def main():
    bench = tyro.cli(Bench, description=__doc__)
    rows = []
    for budget in bench.budgets:
        out_dir = os.path.join("runs", f"bench_memory_{budget}")
        command = [sys.executable, "ppo.py", "--env", bench.env, "--total-timesteps", str(budget),
                   "--out-dir", out_dir, *bench.extra]  # fmt: skip
        mb, last_line = peak_rss_mb(command)
        rows.append(dict(total_timesteps=budget, peak_rss_mb=round(mb, 1)))
        print(f"{budget:>12,} steps: peak RSS {mb:8.1f} MB | {last_line}", flush=True)
    low = min(r["peak_rss_mb"] for r in rows)
    spread = (max(r["peak_rss_mb"] for r in rows) - low) / low
    print(f"\n{bench.env}, flags {' '.join(bench.extra)}, on {os.cpu_count()} CPU cores")
    print("| total_timesteps | peak RSS (MB) |\n|---|---|")
    for r in rows:
        print(f"| {r['total_timesteps']:,} | {r['peak_rss_mb']:.1f} |")
    print(f"spread: {spread:.1%} of the smallest (target: within 10%)")
    with open(bench.out + ".tmp", "w") as f:
        json.dump(dict(config=dataclasses.asdict(bench), rows=rows, spread=spread), f, indent=2)
    os.replace(bench.out + ".tmp", bench.out)


if __name__ == "__main__":
    main()

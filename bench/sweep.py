"""Search the `cpu` preset tier of one env: which settings reach the highest deterministic evaluation within a
wall-clock budget on this machine, for ppo.py and dpo.py alike. Three stages, each resumable (a finished run is
not run again), all runs under runs/sweep/{env}/:

1. screen: every candidate below, one seed per script. A run is stopped once `--budget-s` of wall time has passed
   (compile included); it is evaluated every 250k steps, and its score is the last evaluation within the budget
   (none: ranked last). Candidates change the base (PureJaxRL's settings, the ant tier) one group of settings at a time.
2. final: the `--finalists` best candidates by the mean of both scripts' scores, 3 seeds each, trained to the
   steps the slower script reached within the budget.
3. check: the finalists at twice those steps, 3 seeds: a setting that diverges there is out.

`--stage tier` checks what ships instead: the env's cpu tier itself (`--preset cpu`, each script's own values),
3 seeds, to twice the tier's steps with 8 evaluations (the 4th at the tier's own end); not part of "all".

Runs must be alone on the machine: the score depends on wall time. Returns do not depend on load; times do.

    nohup python bench/sweep.py --env hopper > sweep_hopper.log 2>&1 &   # all stages, resumes
    python bench/sweep.py --env hopper --stage screen --table-only        # what is done so far
    python bench/sweep.py --env hopper --candidates base positional       # only these candidates
    python bench/sweep.py --env hopper --on "--backend positional"        # every candidate on positional physics
    nohup python bench/sweep.py --env ant --stage tier > tier_ant.log 2>&1 &  # the shipped tier at 2x, 3 seeds
"""

import argparse
import csv
import functools
import io
import json
import os
import platform
import subprocess
import sys
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ("--num-envs 2048 --num-steps 10 --num-minibatches 32 --update-epochs 4 --hidden-sizes 256 256 --gamma 0.99 "
        "--max-grad-norm 0.5 --learning-rate 3e-4 --reward-scaling 1 --init-std 1.0 --backend spring")  # fmt: skip
# name: flags on top of BASE (the last of a repeated flag wins). One group of related settings at a time; a
# combination of two good ones is a candidate of its own, added by name below once both have been screened.
CANDIDATES = {
    "base": "",
    "small batch": "--num-envs 512 --num-steps 16 --num-minibatches 8 --update-epochs 4",
    "64-64": "--hidden-sizes 64 64",
    "128-128": "--hidden-sizes 128 128",
    "lr 1e-3": "--learning-rate 1e-3",  # no annealing here: a screen run stops before its planned end
    "gamma 0.97": "--gamma 0.97",
    "gamma 0.995": "--gamma 0.995",
    "std 0.5": "--init-std 0.5",
    "no grad clip": "--max-grad-norm 0",
    "one clip norm": "--no-clip-per-network",  # PureJaxRL's clip: base before 12-05 (bench/README.md)
    "reward scale 0.1": "--reward-scaling 0.1",
    "8 epochs": "--update-epochs 8",
    "positional": "--backend positional",
    "generalized": "--backend generalized",
    # the pendulums' base (ppo.py's PENDULUM) without its annealing and its init std 0.3: many small updates
    "pendulum base": "--num-envs 128 --num-steps 32 --num-minibatches 4 --learning-rate 1e-3 --gamma 0.995 "
    "--hidden-sizes 64 64 --normalize-rewards",
}
ENVS = dict(  # wall-clock budget per run (s), settings the env needs
    inverted_pendulum=(300, ""),  # only for --stage tier: its tier was not found by this sweep
    ant=(300, ""),
    hopper=(300, ""),
    walker2d=(300, ""),
    halfcheetah=(300, ""),
    humanoid=(600, ""),
    inverted_double_pendulum=(300, ""),  # its tier: the pendulums' base, not one of these candidates
    reacher=(300, "--action-repeat 4"),
    pusher=(300, ""),
)
# Screen runs plan more steps than any reaches in its budget, with an evaluation every 250k steps (the evaluations'
# time counts against the budget, alike for every candidate).
SCREEN_STEPS, SCREEN_EVALS = 12_000_000, 48
SCRIPTS = ("ppo.py", "dpo.py")


def cpu_model():
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")


class Sweep(NamedTuple):
    """One env's search, its candidates on top of BASE + the env's flags + `on` (e.g. another backend)."""

    env: str
    on: str = ""

    @property
    def name(self):  # names its runs' folder and its JSON: hopper, or hopper+backend_positional
        return self.env + (f"+{'_'.join(self.on.replace('--', '').split())}" if self.on else "")


def run_dir(sweep, stage, candidate, script):
    return os.path.join(
        ROOT, "runs", "sweep", sweep.name, stage, candidate.replace(" ", "_"), script.removesuffix(".py")
    )


def command(sweep, candidate, script, steps, seeds, out):
    extra = ENVS[sweep.env][1]
    return [sys.executable, os.path.join(ROOT, script), "--env", sweep.env, "--preset", "paper", *BASE.split(),
            *extra.split(), *sweep.on.split(), *CANDIDATES[candidate].split(), "--total-timesteps", str(steps),
            "--num-seeds", str(seeds),
            "--num-evals", str(SCREEN_EVALS if steps == SCREEN_STEPS else 8), "--out-dir", out]  # fmt: skip


def tier_steps(env, script):
    """The steps of the script's own cpu tier for env (read from the script: its presets are the truth)."""
    sys.path.insert(0, ROOT)
    return __import__(script.removesuffix(".py")).preset_for(env, "cpu")["total_timesteps"]


def tier_command(sweep, script, steps, seeds, out):
    return [sys.executable, os.path.join(ROOT, script), "--env", sweep.env, "--preset", "cpu", *sweep.on.split(),
            "--total-timesteps", str(steps), "--num-seeds", str(seeds), "--num-evals", "8",
            "--out-dir", out]  # fmt: skip


def run(sweep, stage, candidate, script, steps, seeds, budget_s=None):
    """One run of the script; with budget_s it is stopped after that wall time (metrics.csv keeps its evaluations).
    done.json marks it finished."""
    out = run_dir(sweep, stage, candidate, script)
    if os.path.exists(os.path.join(out, "done.json")):
        return
    make = tier_command if stage == "tier" else functools.partial(command, candidate=candidate)
    cmd = make(sweep, script=script, steps=steps, seeds=seeds, out=out)
    print(f"[{time.strftime('%H:%M:%S')}] {stage} {candidate} {script}: {' '.join(cmd[2:])}", flush=True)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    with open(os.path.join(out, "stdout.txt"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=budget_s + 10 if budget_s else None)  # + the interpreter's start-up
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    done = dict(wall_s=round(time.time() - start, 1), stopped_at_budget=proc.returncode < 0, cpu=cpu_model())
    with open(os.path.join(out, "done.json"), "w") as f:
        json.dump(done, f)
    with open(os.path.join(out, "stdout.txt")) as f:
        tail = f.read().strip().splitlines()[-1:]
    print(f"[{time.strftime('%H:%M:%S')}] {stage} {candidate} {script}: {tail[0] if tail else ''}", flush=True)


def read(sweep, stage, candidate, script, budget_s):
    """The run's score: the mean over seeds of its last evaluation within budget_s (compile included; all of them
    when budget_s is None), with the steps it came at, the per-seed values and whether it diverged; None if not
    run."""
    out = run_dir(sweep, stage, candidate, script)
    if not os.path.exists(os.path.join(out, "done.json")):
        return None
    with open(os.path.join(out, "stdout.txt")) as f:
        compiled = [line for line in f if line.startswith("compiled in ")]
    compile_s = float(compiled[0].split()[2]) if compiled else 0.0
    evals, diverged = {}, os.path.exists(os.path.join(out, "summary.json"))
    if diverged:
        with open(os.path.join(out, "summary.json")) as f:
            diverged = json.load(f).get("diverged", False)
    with (
        open(os.path.join(out, "metrics.csv"))
        if os.path.exists(os.path.join(out, "metrics.csv"))
        else io.StringIO() as f
    ):
        for row in csv.DictReader(f):
            if row["eval_return"]:
                t = float(row["elapsed_s"]) + compile_s
                evals.setdefault((int(row["env_steps"]), t), []).append(float(row["eval_return"]))
    within = [(steps, v) for (steps, t), v in sorted(evals.items()) if budget_s is None or t <= budget_s]
    steps, per_seed = within[-1] if within else (0, [])
    score = sum(per_seed) / len(per_seed) if per_seed else float("-inf")  # no evaluation in the budget: last
    return dict(score=score, steps=steps, per_seed=per_seed, diverged=diverged)


def ranked(sweep, candidates, budget_s):
    """Screened candidates, best first by the mean of both scripts' scores."""
    scores = {}
    for c in candidates:
        runs = [read(sweep, "screen", c, s, budget_s) for s in SCRIPTS]
        if all(r is not None for r in runs):
            scores[c] = sum(r["score"] for r in runs) / len(runs)
    return sorted(scores, key=scores.get, reverse=True)


def tier_table(sweep):
    """Per script: each seed's evaluation at the tier's own steps, its lowest after them, and at twice the steps."""
    lines = ["| script | steps (tier / 2×) | eval at the tier's end | lowest eval after it | eval at 2× | diverged |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for script in SCRIPTS:
        out, steps = run_dir(sweep, "tier", "tier", script), tier_steps(sweep.env, script)
        if not os.path.exists(os.path.join(out, "done.json")):
            continue
        evals = {}
        with open(os.path.join(out, "metrics.csv")) as f:
            for row in csv.DictReader(f):
                if row["eval_return"]:
                    evals.setdefault(int(row["env_steps"]), []).append(float(row["eval_return"]))
        at = min(evals, key=lambda k: abs(k - steps))  # the evaluation nearest the tier's steps
        after = [v for k, v in evals.items() if k > at]
        lowest = [min(vs) for vs in zip(*after, strict=True)] if after else []
        fmt = lambda vs: " / ".join(f"{v:,.0f}" for v in vs)
        diverged = read(sweep, "tier", "tier", script, None)["diverged"]
        lines.append(f"| {script} | {steps / 1e6:.2f}M / {2 * steps / 1e6:.2f}M | {fmt(evals[at])} | "
                     f"{fmt(lowest)} | {fmt(evals[max(evals)])} at {max(evals) / 1e6:.2f}M | "
                     f"{'**yes**' if diverged else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def table(sweep, stage, candidates, budget_s):
    budget = budget_s if stage == "screen" else None
    head = "score (last eval within budget)" if budget else "final eval per seed"
    lines = [
        f"| candidate | flags | ppo.py {head} | dpo.py {head} | ppo / dpo steps | mean |",
        "|---|---|---|---|---|---|",
    ]
    for c in candidates:
        runs = [read(sweep, stage, c, s, budget) for s in SCRIPTS]
        if any(r is None for r in runs):
            continue

        def cell(r):
            if r["diverged"]:
                return "diverged"
            if not r["per_seed"]:
                return "no eval in budget"
            return f"{r['score']:,.0f}" if budget else " / ".join(f"{x:,.0f}" for x in r["per_seed"])

        steps = " / ".join(f"{r['steps'] / 1e6:.2f}M" for r in runs)
        mean = sum(r["score"] for r in runs) / len(runs)
        mean = f"{mean:,.0f}" if mean > float("-inf") else "—"
        lines.append(f"| {c} | `{CANDIDATES[c]}` | {cell(runs[0])} | {cell(runs[1])} | {steps} | {mean} |")
    return "\n".join(lines)


def keep(report, machines, stage, found):
    """A stage's table with this machine's runs; without any (another clone, or none run yet) the saved one stays."""
    if found.count("\n") > 1 or stage not in report:
        report[stage], machines[stage] = found, cpu_model()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", required=True, choices=sorted(ENVS))
    parser.add_argument("--stage", choices=("screen", "final", "check", "all", "tier"), default="all")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help="candidate names, as above")
    parser.add_argument("--finalists", type=int, default=2)
    parser.add_argument("--budget-s", type=float, help="wall-clock budget per run (default: the env's, above)")
    parser.add_argument("--on", default="", help='flags every candidate adds to the base, e.g. "--backend positional"')
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    unknown = [c for c in args.candidates if c not in CANDIDATES]
    if unknown:
        raise SystemExit(f"error: unknown candidate(s) {unknown}; choose from: {', '.join(CANDIDATES)}")
    budget_s = args.budget_s or ENVS[args.env][0]
    stages = ("screen", "final", "check") if args.stage == "all" else (args.stage,)
    sweep = Sweep(args.env, args.on)
    out = os.path.join(ROOT, "bench", f"sweep_{sweep.name}.json")
    report, machines = {}, {}  # each table's CPU: tables of other stages may come from other machines
    if os.path.exists(out):  # the tables of the stages not run now are kept
        with open(out) as f:
            old = json.load(f)
        report = old["tables"]
        machines = old.get("cpu_per_table", {table: old.get("cpu") for table in report})
    if args.stage == "tier":
        for script in SCRIPTS if not args.table_only else ():
            run(sweep, "tier", "tier", script, 2 * tier_steps(args.env, script), 3)
        keep(report, machines, "tier", tier_table(sweep))
        print(f"\n### {sweep.name}, the cpu tier at twice its steps\n\n{report['tier']}\n", flush=True)
        stages = ()
    for stage in stages:
        candidates = args.candidates if stage == "screen" else ranked(sweep, args.candidates, budget_s)
        candidates = candidates if stage == "screen" else candidates[: args.finalists]
        for c in candidates if not args.table_only else ():
            for script in SCRIPTS:
                if stage == "screen":
                    run(sweep, stage, c, script, SCREEN_STEPS, 1, budget_s)
                else:  # the steps both scripts reached within the budget (2× for the check), 3 seeds
                    reached = min(read(sweep, "screen", c, s, budget_s)["steps"] for s in SCRIPTS)
                    run(sweep, stage, c, script, reached * (2 if stage == "check" else 1), 3)
        keep(report, machines, stage, table(sweep, stage, candidates, budget_s))
        print(f"\n### {sweep.name}, {stage}\n\n{report[stage]}\n", flush=True)
    blob = dict(env=args.env, on=args.on, budget_s=budget_s, cpu_per_table=machines, nproc=os.cpu_count(),
                python=platform.python_version(), base=BASE, tables=report)  # fmt: skip
    with open(out + ".tmp", "w") as f:
        json.dump(blob, f, indent=1)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()

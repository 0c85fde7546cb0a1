"""Which implementation details matter: ppo.py and dpo.py with one detail changed at a time, at PureJaxRL's
settings, scored by the deterministic evaluation. Each arm is one run of the real script (seeds vmapped),
saved under runs/ablation/{env}/{arm}; an arm whose summary.json exists is not run again, so the command
resumes where it stopped. The table is printed and written to bench/ablation_{env}.json.

    nohup python bench/ablation.py --env ant > ablation_ant.log 2>&1 &
    nohup python bench/ablation.py --env hopper > ablation_hopper.log 2>&1 &   # hopper's arms (DEFAULT_ARMS)
    nohup python bench/ablation.py --env walker2d --seeds 3 > ablation_walker2d.log 2>&1 &
    nohup python bench/ablation.py --env halfcheetah --seeds 3 > ablation_halfcheetah.log 2>&1 &
    nohup python bench/ablation.py --env humanoid --seeds 3 > ablation_humanoid.log 2>&1 &
    python bench/ablation.py --env ant --arms ppo dpo        # only these arms
    python bench/ablation.py --env ant --table-only          # the table of what is done
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# PureJaxRL's Brax settings (2048 envs × 10 steps, 32 minibatches × 4 epochs, 256-256, γ 0.99, grad clip 0.5), at
# a CPU-sized budget per env; like PureJaxRL, one gradient norm over both networks unless an arm says otherwise.
# Every flag not named here is the script's default.
COMMON = {
    "ant": "--env ant --total-timesteps 3686400 --backend spring",
    # hopper's cpu tier: positional physics, where it learns more than on spring (bench/README.md, sweep.py)
    "hopper": "--env hopper --total-timesteps 3276800 --backend positional",
    "inverted_pendulum": "--env inverted_pendulum --total-timesteps 1024000 --backend spring",
    # walker2d's cpu tier: the same base, positional, 2,252,800 steps: far from walking; what lifts it there?
    "walker2d": "--env walker2d --total-timesteps 2252800 --backend positional",
    # halfcheetah's cpu tier: the base on spring, 2,007,040 steps (98 updates of 2048 × 10, 245 of the small batch)
    "halfcheetah": "--env halfcheetah --total-timesteps 2007040 --backend spring",
    # humanoid's cpu tier: the base on spring, 4,505,600 steps (220 updates)
    "humanoid": "--env humanoid --total-timesteps 4505600 --backend spring",
}
PUREJAXRL = ("--num-envs 2048 --num-steps 10 --num-minibatches 32 --update-epochs 4 --hidden-sizes 256 256 "
             "--gamma 0.99 --max-grad-norm 0.5 --no-clip-per-network --learning-rate 3e-4 "
             "--reward-scaling 1")  # fmt: skip
# The authors' single-file PPO differs from ours as it was in four details: Gaussian samples clipped to [-1, 1]
# (now the default), rewards normalised by the running std of the discounted return (here per step and clipped to
# ±10; off by default), value clipping (off by default) and orthogonal init (the default since the arms marked
# "orthogonal init"; the earlier arms ran with a variance-scaled init of the same scale). Each arm states the
# flags, so that it means the same whatever the defaults are.
BEFORE = "--no-normalize-rewards --tanh-squash"  # the scripts' defaults before this ablation
SMALL = "--num-envs 512 --num-steps 16 --num-minibatches 8"  # 2.5× the updates from the same steps (sweep.py's)
ARMS = {  # name: (script, flags on top of COMMON and PUREJAXRL[, seeds])
    "ppo before": ("ppo.py", BEFORE),
    "ppo + reward norm": ("ppo.py", "--normalize-rewards --tanh-squash"),
    "ppo + clipped actions": ("ppo.py", "--no-normalize-rewards --no-tanh-squash"),
    "ppo + value clip": ("ppo.py", f"{BEFORE} --vf-clip 0.2"),
    "ppo + reward norm + clipped actions": ("ppo.py", "--normalize-rewards --no-tanh-squash"),
    "ppo + reward norm + clipped actions + value clip": (
        "ppo.py",
        "--normalize-rewards --no-tanh-squash --vf-clip 0.2",
    ),
    "ppo + clipped actions + orthogonal init (default)": ("ppo.py", "--no-normalize-rewards --no-tanh-squash"),
    # the arm's --backend comes after COMMON's on the command line, and the last one given wins
    "ppo + clipped actions + orthogonal init, positional": (
        "ppo.py",
        "--no-normalize-rewards --no-tanh-squash --backend positional",
    ),
    # the defaults on four more seeds: is the gap to the authors' PPO seed noise? (a third item: its seed count)
    "ppo default, seeds 2-5": ("ppo.py", "--no-normalize-rewards --no-tanh-squash --seed 2", 4),
    "ppo default, no gradient clip": ("ppo.py", "--no-normalize-rewards --no-tanh-squash --max-grad-norm 0"),
    # the gradient clip on each network apart instead of PureJaxRL's one norm over both (the default since 12-05)
    "ppo, clip per network (default now)": ("ppo.py", "--no-normalize-rewards --no-tanh-squash --clip-per-network"),
    "ppo, clip per network, seeds 2-5": (
        "ppo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --seed 2",
        4,
    ),
    "ppo, clip per network, annealed lr": (
        "ppo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --anneal-lr",
    ),
    "ppo, clip per network, lr 6e-4": (
        "ppo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --learning-rate 6e-4",
    ),
    # Brax's own PPO clips the ratio at 0.3: on ant's cpu tier ppo.py took off sooner with it (time_to_return)
    "ppo, clip per network, clip eps 0.3": (
        "ppo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --clip-eps 0.3",
    ),
    "ppo, clip per network, clip eps 0.3, seeds 2-5": (
        "ppo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --clip-eps 0.3 --seed 2",
        4,
    ),
    # the two clipping ranges paired on one CPU: six seeds vmapped in one run each, nothing else different
    "ppo, clip eps 0.2, seeds 0-5": (
        "ppo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --clip-eps 0.2",
        6,
    ),
    "ppo, clip eps 0.3, seeds 0-5": (
        "ppo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --clip-eps 0.3",
        6,
    ),
    # the authors' remaining differences, each alone on top of today's defaults (hopper's arms)
    "ppo, clip per network, tanh-squashed actions": (
        "ppo.py",
        "--no-normalize-rewards --tanh-squash --clip-per-network",
    ),
    "ppo, clip per network, reward norm": ("ppo.py", "--normalize-rewards --no-tanh-squash --clip-per-network"),
    "ppo, clip per network, value clip": (
        "ppo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --vf-clip 0.2",
    ),
    "ppo, clip per network, reward norm + value clip": (
        "ppo.py",
        "--normalize-rewards --no-tanh-squash --clip-per-network --vf-clip 0.2",
    ),
    "dpo before": ("dpo.py", BEFORE),
    "dpo + clipped actions": ("dpo.py", "--no-normalize-rewards --no-tanh-squash"),
    "dpo + clipped actions + orthogonal init (default)": ("dpo.py", "--no-normalize-rewards --no-tanh-squash"),
    "dpo default, no gradient clip": ("dpo.py", "--no-normalize-rewards --no-tanh-squash --max-grad-norm 0"),
    "dpo, clip per network (default now)": ("dpo.py", "--no-normalize-rewards --no-tanh-squash --clip-per-network"),
    "dpo, clip per network, seeds 2-5": (
        "dpo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --seed 2",
        4,
    ),
    "dpo, clip per network, annealed lr": (
        "dpo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --anneal-lr",
    ),
    "dpo, clip per network, lr 6e-4": (
        "dpo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --learning-rate 6e-4",
    ),
    # walker2d's arms: Brax's own γ for it, and more updates from the same steps
    "ppo, clip per network, gamma 0.97": (
        "ppo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --gamma 0.97",
    ),
    "dpo, clip per network, gamma 0.97": (
        "dpo.py",
        "--no-normalize-rewards --no-tanh-squash --clip-per-network --gamma 0.97",
    ),
    "ppo, clip per network, small batch": (
        "ppo.py",
        f"--no-normalize-rewards --no-tanh-squash --clip-per-network {SMALL}",
    ),
    "dpo, clip per network, small batch": (
        "dpo.py",
        f"--no-normalize-rewards --no-tanh-squash --clip-per-network {SMALL}",
    ),
    "ppo, clip per network, small batch, clip eps 0.3": (
        "ppo.py",
        f"--no-normalize-rewards --no-tanh-squash --clip-per-network {SMALL} --clip-eps 0.3",
    ),
    "dpo + reward norm + clipped actions": ("dpo.py", "--normalize-rewards --no-tanh-squash"),
    "dpo + reward norm + clipped actions + value clip": (
        "dpo.py",
        "--normalize-rewards --no-tanh-squash --vf-clip 0.2",
    ),
}


# The arms run when --arms is not given: on ant every arm; on hopper today's defaults, the one clip norm they
# replaced ("ppo default" was PureJaxRL's one clip norm then), and each of the authors' other differences alone;
# on walker2d, halfcheetah and humanoid their tiers as they were and one change at a time.
DEFAULT_ARMS = {
    "hopper": [
        "ppo, clip per network (default now)",
        "dpo, clip per network (default now)",
        "ppo + clipped actions + orthogonal init (default)",
        "ppo, clip per network, tanh-squashed actions",
        "ppo, clip per network, reward norm",
        "ppo, clip per network, value clip",
        "ppo, clip per network, reward norm + value clip",
        # the two clips again on four more seeds: does the one clip norm's lead on hopper hold?
        "ppo, clip per network, seeds 2-5",
        "ppo default, seeds 2-5",
        "dpo, clip per network, seeds 2-5",
        # Brax's PPO clipping range on six seeds
        "ppo, clip per network, clip eps 0.3",
        "ppo, clip per network, clip eps 0.3, seeds 2-5",
        # walker2d's smaller batch on hopper's tier (--seeds 3)
        "ppo, clip per network, small batch, clip eps 0.3",
        "dpo, clip per network, small batch",
    ],
    # the tier (3 seeds: --seeds 3), then one change at a time
    "walker2d": [
        "ppo, clip per network (default now)",
        "dpo, clip per network (default now)",
        "ppo, clip per network, gamma 0.97",
        "dpo, clip per network, gamma 0.97",
        "ppo, clip per network, small batch",
        "dpo, clip per network, small batch",
        "ppo, clip per network, clip eps 0.3",
        "ppo, clip per network, small batch, clip eps 0.3",
    ],
    # the tier (--seeds 3), walker2d's smaller batch, and Brax's PPO clipping range
    "halfcheetah": [
        "ppo, clip per network (default now)",
        "dpo, clip per network (default now)",
        "ppo, clip per network, small batch",
        "dpo, clip per network, small batch",
        "ppo, clip per network, clip eps 0.3",
        "ppo, clip per network, small batch, clip eps 0.3",
    ],
    # the tier (--seeds 3) and Brax's PPO clipping range
    "humanoid": ["ppo, clip per network (default now)", "ppo, clip per network, clip eps 0.3"],
}


def arm_flags(arm):
    """The arm's script and flags. ppo.py's arms clip the ratio at the authors' 0.2 unless they say otherwise, as
    they all ran before ant's, hopper's and halfcheetah's cpu tiers took Brax's 0.3."""
    script, flags, *_ = ARMS[arm]
    if script == "ppo.py" and "--clip-eps" not in flags:
        flags += " --clip-eps 0.2"
    return script, flags


def cpu_model():
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")


def arm_dir(env, arm):
    name = arm.replace(" + ", "+").replace(" (default)", "").replace(" ", "_")
    return os.path.join(ROOT, "runs", "ablation", env, name)


def run_arm(env, arm, seeds, num_evals):
    out = arm_dir(env, arm)
    if os.path.exists(os.path.join(out, "summary.json")):
        return
    (script, flags), own_seeds = arm_flags(arm), ARMS[arm][2:]
    seeds = own_seeds[0] if own_seeds else seeds
    cmd = [sys.executable, os.path.join(ROOT, script), *COMMON[env].split(), *PUREJAXRL.split(), *flags.split(),
           "--num-seeds", str(seeds), "--num-evals", str(num_evals), "--out-dir", out]  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {arm}: {' '.join(cmd[1:])}", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if os.path.isdir(out):
        with open(os.path.join(out, "cpu.txt"), "w") as f:
            f.write(cpu_model())
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:]
    print(f"[{time.strftime('%H:%M:%S')}] {arm}: {tail[0] if tail else result.returncode}", flush=True)


def read_arm(env, arm):
    out = arm_dir(env, arm)
    if not os.path.exists(os.path.join(out, "summary.json")):
        return None
    summary = json.load(open(os.path.join(out, "summary.json")))
    with open(os.path.join(out, "metrics.csv")) as f:
        evals = {}
        for row in csv.DictReader(f):
            if row["eval_return"]:
                evals.setdefault(int(row["env_steps"]), []).append(float(row["eval_return"]))
    curve = {steps: sum(v) / len(v) for steps, v in sorted(evals.items())}
    cpu = open(os.path.join(out, "cpu.txt")).read() if os.path.exists(os.path.join(out, "cpu.txt")) else "?"
    script, flags = arm_flags(arm)
    return dict(summary, curve=curve, cpu=cpu, command=" ".join([script, COMMON[env], PUREJAXRL, flags]))


def table(env, arms):
    rows = {arm: read_arm(env, arm) for arm in arms}
    lines = ["| arm | eval return per seed | mean | evals during training (mean of seeds) | run s |",
             "|---|---|---|---|---|"]  # fmt: skip
    for arm, r in rows.items():
        if r is None:
            lines.append(f"| {arm} | not run | | | |")
            continue
        per_seed = " / ".join(f"{x:,.0f}" for x in r["eval_return_per_seed"])
        curve = " / ".join(f"{v:,.0f}" for v in list(r["curve"].values())[:-1])
        lines.append(f"| {arm} | {per_seed} | **{r['eval_return_mean']:,.0f}** | {curve} | {r['run_s']:.0f} |")
    return "\n".join(lines), rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="ant", choices=sorted(COMMON))
    parser.add_argument("--arms", nargs="+", help="arm names exactly, or their first words (default: the env's arms)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--num-evals", type=int, default=4)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    args.arms = args.arms or DEFAULT_ARMS.get(args.env, list(ARMS))
    arms = [a for a in args.arms if a in ARMS] or [a for a in ARMS if any(a.startswith(s) for s in args.arms)]
    if not arms:
        raise SystemExit(f"error: no arm matches {args.arms}; arms: {', '.join(ARMS)}")
    if not args.table_only:
        for arm in arms:
            run_arm(args.env, arm, args.seeds, args.num_evals)
    text, rows = table(args.env, arms)
    print(text)
    out = os.path.join(ROOT, "bench", f"ablation_{args.env}.json")
    done = {arm: r for arm, r in rows.items() if r is not None}
    old = json.load(open(out))["arms"] if os.path.exists(out) else {}
    blob = dict(env=args.env, nproc=os.cpu_count(), python=platform.python_version(), arms={**old, **done})
    with open(out + ".tmp", "w") as f:
        json.dump(blob, f, indent=1)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()

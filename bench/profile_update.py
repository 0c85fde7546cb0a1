"""Where ppo.py's training time goes: rollout (physics + acting) against the update epochs.

    python bench/profile_update.py --env hopper --hidden-sizes 256 256 --hidden-sizes-small 64 64

Each update of ppo.py is one rollout (num_envs × num_steps env steps, the policy and value networks run on
every step), GAE, then update_epochs passes of minibatch gradient steps. Training at 1, 2 and 4 epochs
with everything else fixed, the run time per update is a straight line in the epochs: its slope is the
cost of one epoch, its intercept the rollout + GAE. Env-only stepping (random actions, no networks) gives
the physics alone, so the table splits an update into physics, networks while acting, and learning. It
does this for two network sizes, since on a CPU the update's matrix products scale with width².
"""

import dataclasses
import json
import os
import platform
import sys

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import env_only, ours, ppo  # noqa: E402


@dataclasses.dataclass
class Profile:
    env: str = "hopper"
    """Brax environment."""
    num_envs: int = 512
    """Parallel environments."""
    num_steps: int = 16
    """Rollout length per update."""
    num_minibatches: int = 8
    """Minibatches per epoch."""
    epochs: tuple[int, ...] = (1, 2, 4)
    """Update epochs to time; the fit needs at least two."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden layers of the policy and value networks (ppo.py's default)."""
    hidden_sizes_small: tuple[int, ...] = (64, 64)
    """A smaller network to compare with."""
    total_timesteps: int = 500_000
    """Environment steps per timed run."""
    out: str = "bench/profile_update.json"
    """Where to write the table as JSON."""


def main():
    prof = tyro.cli(Profile, description=__doc__)
    if len(set(prof.epochs)) < 2:
        raise SystemExit(f"error: --epochs needs at least two different values, got {prof.epochs}")
    base = dict(env=prof.env, num_envs=prof.num_envs, num_steps=prof.num_steps, num_minibatches=prof.num_minibatches,
                total_timesteps=prof.total_timesteps, num_eval_envs=16)  # fmt: skip
    args = ppo.resolve_args(ppo.Args(**base))
    num_updates = args.total_timesteps // (args.num_envs * args.num_steps)
    env = env_only(prof, args)
    physics_s = args.num_envs * args.num_steps / env["sps"]  # seconds of pure physics per update
    print(f"env-only: {env['sps']:,.0f} steps/s ({physics_s * 1e3:.1f} ms per update of "
          f"{args.num_envs * args.num_steps} steps)", flush=True)  # fmt: skip
    rows = []
    for hidden in (prof.hidden_sizes, prof.hidden_sizes_small):
        per_update = []
        for epochs in prof.epochs:
            run = ours(prof, ppo.resolve_args(ppo.Args(**base, hidden_sizes=hidden, update_epochs=epochs)))
            per_update.append(run["run_s"] / num_updates)
            print(f"hidden {hidden} epochs {epochs}: {run['sps']:,.0f} steps/s, {per_update[-1] * 1e3:.1f} ms "
                  f"per update", flush=True)  # fmt: skip
            rows.append(dict(hidden=list(hidden), epochs=epochs, sps=run["sps"], ms_per_update=per_update[-1] * 1e3))
        epoch_s, rollout_s = np.polyfit(prof.epochs, per_update, 1)
        for row in rows[-len(prof.epochs) :]:
            total = row["ms_per_update"] / 1e3
            row.update(physics_share=physics_s / total, acting_share=(rollout_s - physics_s) / total,
                       learning_share=epoch_s * row["epochs"] / total, ms_per_epoch=epoch_s * 1e3,
                       sps_over_env_only=row["sps"] / env["sps"])  # fmt: skip

    print(f"\n{prof.env}, {args.backend}, {args.num_envs} envs × {args.num_steps} steps, "
          f"{args.num_minibatches} minibatches; env-only {env['sps']:,.0f} steps/s; "
          f"{platform.machine()}, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| hidden | epochs | steps/s | × env-only | ms/update | physics | acting nets + GAE | learning |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {tuple(r['hidden'])} | {r['epochs']} | {r['sps']:,.0f} | {r['sps_over_env_only']:.2f} | "
              f"{r['ms_per_update']:.1f} | {r['physics_share']:.0%} | {r['acting_share']:.0%} | "
              f"{r['learning_share']:.0%} |")  # fmt: skip
    with open(prof.out + ".tmp", "w") as f:
        json.dump(dict(env_only_sps=env["sps"], rows=rows), f, indent=2)
    os.replace(prof.out + ".tmp", prof.out)


if __name__ == "__main__":
    main()

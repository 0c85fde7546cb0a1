"""What turning XLA:CPU's YNNPACK fusions off (the scripts' `compiler_options`) does to training and env stepping.

    python bench/ynn.py --env ant --hidden-sizes 128 128 --update-epochs 8

jaxlib 0.10's XLA hands small fusions and matrix products to YNNPACK by default; ppo.py, dpo.py, lpo_meta.py
and eval_transfer.py compile with `xla_cpu_experimental_ynn_fusion_type` empty instead. This compiles ppo.py's
train and an env-only scan (random actions) both ways in one process and times them `--repeats` times,
interleaved, so a drifting machine hits both alike. The train time includes the final evaluation
(16 envs). Rerun it after a jaxlib upgrade: when the ratio nears 1, the option can go. `--also` times further
XLA:CPU options on top of the scripts' own, in the same interleaved rounds:

    python bench/ynn.py --also xla_cpu_use_fusion_emitters=false xla_cpu_multi_thread_eigen=false
"""

import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from throughput import make_env_only  # noqa: E402  (bench/ is on the path when this runs as a script)

import ppo  # noqa: E402


@dataclasses.dataclass
class Bench:
    env: str = "ant"
    """Brax environment."""
    num_envs: int = 512
    """Parallel environments."""
    num_steps: int = 16
    """Rollout length per update."""
    num_minibatches: int = 8
    """Minibatches per epoch."""
    update_epochs: int = 4
    """Epochs per update."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layers of the policy and value networks."""
    updates: int = 8
    """Updates per timed training run."""
    repeats: int = 3
    """Interleaved repetitions; the table reports medians."""
    also: tuple[str, ...] = ()
    """XLA:CPU options (name=value; true/false for flags) each timed as one more variant on top of the scripts'."""
    out: str = "bench/ynn.json"
    """Where to write the table as JSON."""


def timed(compiled, *inputs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    return time.perf_counter() - start


def main():
    bench = tyro.cli(Bench, description=__doc__)
    sizes = {k: v for k, v in dataclasses.asdict(bench).items() if k.startswith(("num_", "update_", "hidden_"))}
    args = ppo.resolve_args(ppo.Args(env=bench.env, num_eval_envs=16, **sizes))
    args = ppo.resolve_args(dataclasses.replace(args, total_timesteps=bench.updates * args.num_envs * args.num_steps))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(1))
    env_only = make_env_only(args, bench.updates * args.num_steps)

    variants = {"YNNPACK on (jaxlib default)": {}, "YNNPACK off (the scripts)": ppo.compiler_options()}
    for option in bench.also:
        name, _, value = option.partition("=")
        value = {"true": True, "false": False}.get(value.lower(), value)
        variants[f"the scripts + {option}"] = {**ppo.compiler_options(), name: value}
    compiled, times = {}, {name: {"train_s": [], "env_only_s": []} for name in variants}
    for name, options in variants.items():
        start = time.perf_counter()
        train = jax.jit(ppo.make_train(args), compiler_options=options).lower(keys).compile()
        stepper = jax.jit(env_only, compiler_options=options).lower(keys[0]).compile()
        compiled[name] = (train, stepper, time.perf_counter() - start)
        timed(train, keys), timed(stepper, keys[0])  # warm
    for repeat in range(bench.repeats):
        for name, (train, stepper, _) in compiled.items():
            times[name]["train_s"].append(timed(train, keys))
            times[name]["env_only_s"].append(timed(stepper, keys[0]))
            print(f"[{repeat + 1}/{bench.repeats}] {name}: train {times[name]['train_s'][-1]:.2f} s, env-only "
                  f"{times[name]['env_only_s'][-1]:.2f} s", flush=True)  # fmt: skip
    table = {name: dict(compile_s=compiled[name][2], **{k: statistics.median(v) for k, v in t.items()})
             for name, t in times.items()}  # fmt: skip
    print(f"\n{bench.env} ({args.backend}), {args.num_envs} envs × {args.num_steps} steps, {args.num_minibatches} "
          f"minibatches × {args.update_epochs} epochs, hidden {args.hidden_sizes}, {bench.updates} updates, "
          f"median of {bench.repeats} on {os.cpu_count()} CPU cores ({platform.machine()}), "
          f"jax {jax.__version__}\n")  # fmt: skip
    print("| XLA:CPU | compile s (both) | train s | env-only s |\n|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['compile_s']:.1f} | {r['train_s']:.2f} | {r['env_only_s']:.2f} |")
    on, off = list(table.values())[:2]
    speedup = {key: on[key] / off[key] for key in ("train_s", "env_only_s")}
    print(f"off is faster by: train {speedup['train_s']:.2f}x, env-only {speedup['env_only_s']:.2f}x")
    for name, r in list(table.items())[2:]:
        print(f"{name} against the scripts: train {off['train_s'] / r['train_s']:.2f}x faster, env-only "
              f"{off['env_only_s'] / r['env_only_s']:.2f}x")  # fmt: skip
    with open(bench.out + ".tmp", "w") as f:
        json.dump(dict(config=dataclasses.asdict(bench), table=table, speedup=speedup), f, indent=2)
    os.replace(bench.out + ".tmp", bench.out)


if __name__ == "__main__":
    main()

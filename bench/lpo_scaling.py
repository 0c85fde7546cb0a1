"""Wall time of one lpo_meta.py generation as the population grows, and what each member costs.

    python bench/lpo_scaling.py --populations 1 4 16 64

A generation vmaps the population over whole inner training runs in one jitted call; on a CPU the cores
saturate early, so the cost per member should fall and then flatten (it must never exceed one single run).
Population 1 is a single inner run (make_train on its own); the others are whole ES generations
(ask → train every member → tell), timed after compilation, the median of `--repeats`. Each generation is
timed next to a single run, repeat by repeat, so that "× K single runs" compares neighbours on a machine
whose speed drifts.
"""

import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lpo_meta  # noqa: E402


@dataclasses.dataclass
class Bench:
    populations: tuple[int, ...] = (1, 4, 16, 64)
    """Population sizes to time (1: a single inner run; the others must be even)."""
    env: str = "inverted_pendulum"
    """Inner environment."""
    inner: tuple[str, ...] = ("total_timesteps=200000", "num_envs=128", "num_steps=16", "num_minibatches=4",
                              "hidden_sizes=64,64", "num_eval_envs=16")  # fmt: skip
    """lpo_meta.py Args overrides for the inner runs, as name=value."""
    repeats: int = 2
    """Timed generations per population (after one compile), each next to a timed single run."""
    out: str = "bench/lpo_scaling.json"
    """Where to write the table as JSON."""


def make_args(bench, population):
    preset = lpo_meta.resolve_args(lpo_meta.Args(env=bench.env))  # for the type of each overridden field
    overrides = {}
    for name, value in (flag.split("=") for flag in bench.inner):
        kind = type(getattr(preset, name))
        overrides[name] = tuple(int(v) for v in value.split(",")) if kind is tuple else kind(value)
    args = lpo_meta.Args(env=bench.env, population_size=max(population, 2), **overrides)
    return lpo_meta.check_lpo_args(lpo_meta.resolve_args(args))


def compile_single_run(args):
    """Seconds to compile one inner run (make_train on its own), and a function that runs it, returning seconds."""
    drift_params = lpo_meta.init_drift_params(jax.random.PRNGKey(0), args.temporal)
    train = lpo_meta.make_train(args, drift_params)
    train = jax.jit(train, compiler_options=lpo_meta.compiler_options())
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(args.num_rollouts))
    start = time.perf_counter()
    compiled = train.lower(keys).compile()
    compile_s = time.perf_counter() - start

    def run():
        start = time.perf_counter()
        jax.block_until_ready(compiled(keys))
        return time.perf_counter() - start

    return compile_s, run


def compile_generation(args):
    """Seconds to compile one whole ES generation, and a function that runs the next one, returning seconds."""
    strategy, _ = lpo_meta.make_strategy(args)
    mean = lpo_meta.init_drift_params(jax.random.PRNGKey(1), args.temporal)
    es_state = strategy.init(jax.random.PRNGKey(2), mean, strategy.default_params)
    mesh = jax.make_mesh((jax.device_count(),), ("population",), (jax.sharding.AxisType.Auto,))
    state = jax.device_put(
        jax.tree.map(np.asarray, (es_state, jax.random.PRNGKey(3))), NamedSharding(mesh, PartitionSpec())
    )
    start = time.perf_counter()
    generation = lpo_meta.make_generation(args, strategy, mesh).lower(*state).compile()
    compile_s = time.perf_counter() - start

    def run():
        nonlocal state
        start = time.perf_counter()
        es_state, key, _, _ = jax.block_until_ready(generation(*state))
        state = (es_state, key)
        return time.perf_counter() - start

    return compile_s, run


def main():
    bench = tyro.cli(Bench, description=__doc__)
    single_compile_s, run_single = compile_single_run(make_args(bench, 1))
    rows = []
    for population in bench.populations:
        args = make_args(bench, population)
        compile_s, run = (single_compile_s, run_single) if population == 1 else compile_generation(args)
        singles, generations = [], []
        for _ in range(bench.repeats):  # interleaved, so that the machine's drift hits both alike
            singles.append(run_single())
            generations.append(run())
        seconds, single_s = statistics.median(generations), statistics.median(singles)
        num_updates = args.total_timesteps // (args.num_envs * args.num_steps * args.action_repeat)
        steps = num_updates * args.num_envs * args.num_steps * args.action_repeat * args.num_rollouts * population
        rows.append(dict(population=population, compile_s=round(compile_s, 1), generation_s=round(seconds, 2),
                         per_member_s=round(seconds / population, 3), single_run_s=round(single_s, 3),
                         over_k_single_runs=round(seconds / (population * single_s), 3),
                         steps_per_s=round(steps / seconds)))  # fmt: skip
        print(f"population {population:>3}: compile {compile_s:6.1f} s | generation {seconds:7.2f} s | "
              f"{seconds / population:6.3f} s per member | single run {single_s:6.3f} s | "
              f"{seconds / (population * single_s):.2f} × K single runs | {steps / seconds:9,.0f} steps/s",
              flush=True)  # fmt: skip
    print(f"\n{bench.env}, inner {' '.join(bench.inner)}, {jax.device_count()} device(s), {os.cpu_count()} CPU cores")
    print("| population | compile s | s / generation | s / member | single run s | × K single runs | env steps/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = (r["population"], r["compile_s"], r["generation_s"], r["per_member_s"], r["single_run_s"],
                 r["over_k_single_runs"], f"{r['steps_per_s']:,}")  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    with open(bench.out + ".tmp", "w") as f:
        json.dump(dict(config=dataclasses.asdict(bench), rows=rows), f, indent=2)
    os.replace(bench.out + ".tmp", bench.out)


if __name__ == "__main__":
    main()

"""Wall time to a target eval return: ppo.py and dpo.py against Brax's own PPO trainer at its best setting.

    python bench/time_to_return.py --env ant --target 2000 --budget 655360 --evals 5 --repeats 3
    python bench/time_to_return.py --env ant --target 6000 --budget 4096000 --evals 16 --flags \
        --brax-layout purejaxrl --brax-budget 6144000 --brax-evals 25 --brax-reward-scaling 1 --brax-entropy 0 \
        --max-ratio 0.5 --repeats 3

Every contender is timed alike: the clock starts before anything is compiled, the contender evaluates its
deterministic policy on 128 envs (one full episode each) at evenly spaced points of its budget, and its time
to target is the wall time at its first evaluation at or above the target (evaluation time included, as a
user waits for it too). ppo.py and dpo.py train for `--budget` steps with `--flags` (default: a CPU
setting for ant, the Args default; tuples as comma lists, e.g. hidden_sizes=64,64), dpo.py with `--dpo-flags` on top,
and make `--evals` evaluations (`--flags` given empty: the env's cpu preset); Brax's trainer (`--brax-layout`)
trains for `--brax-budget` steps with `--brax-evals` evaluations (the first at step 0) and stops at its first
evaluation at or above the target (nothing after it would change its time). Each contender runs `--repeats`
times with seeds 0, 1, ..., interleaved; the table gives the median time over the repeats (a repeat that
misses the target counts as infinitely slow). Prints a table; writes JSON after every run (atomically), so a
killed bench keeps what it measured, and the same command resumes it (runs already in `--out` are kept; a file
measured with other options, or with other resolved settings of ppo.py or dpo.py, is not resumed).
"""

import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dpo  # noqa: E402
import ppo  # noqa: E402


@dataclasses.dataclass
class Bench:
    env: str = "ant"
    """Brax environment."""
    target: float = 2000.0
    """Eval return to reach."""
    budget: int = 655_360
    """Env steps of the ppo.py and dpo.py runs."""
    evals: int = 5
    """Evaluations of the ppo.py and dpo.py runs, evenly spaced, the last at the end."""
    flags: tuple[str, ...] = ("num_envs=512", "num_steps=16", "num_minibatches=8", "update_epochs=8",
                              "hidden_sizes=128,128", "init_std=0.6")  # fmt: skip
    """Args overrides for ppo.py and dpo.py, as name=value."""
    dpo_flags: tuple[str, ...] = ()
    """Further overrides for dpo.py alone, applied after --flags (e.g. its own CPU setting)."""
    brax_budget: int = 1_310_720
    """Env steps of the Brax run."""
    brax_evals: int = 11
    """Evaluations of the Brax run (the first at step 0)."""
    brax_layout: Literal["small", "purejaxrl", "brax"] = "small"
    """Brax's settings. small: 512 envs, unroll 16, batch 64 × 8 minibatches, 4 passes, γ 0.97, its default
    networks, no gradient clip (its best found here for early targets). purejaxrl: the layout of ant's cpu
    preset and of PureJaxRL (2048 envs, unroll 10, batch 64 × 32, 4 passes, γ 0.99, 256-256 tanh networks, clip
    ratio 0.2, gradient norm 0.5), at which ppo.py and dpo.py reach high returns within a CPU's budget. brax:
    Brax's own published ant settings for an accelerator (4096 envs, unroll 5, batch 2048 × 32, 4 passes, γ 0.97,
    its default networks)."""
    brax_backend: Literal["spring", "positional", "generalized"] | None = None
    """Brax's physics for its trainer's env (default: the one ppo.py runs with `--flags`, e.g. hopper's cpu preset:
    positional)."""
    brax_max_seconds: float = math.inf
    """Stop Brax's trainer at its first evaluation past this wall time (then its time to target is only bounded
    from below by it)."""
    brax_reward_scaling: float = 10.0
    """Brax's reward scaling."""
    brax_entropy: float = 1e-2
    """Brax's entropy cost."""
    brax_ynn: bool = False
    """Leave XLA's YNNPACK fusions on for Brax's trainer (jaxlib's default, as its users run it). Off (the
    default): turned off process-wide, as ppo.py and dpo.py turn them off for themselves (`compiler_options`),
    so that all contenders run on the same compiler settings."""
    repeats: int = 1
    """Runs of each contender (seeds 0, 1, ...), interleaved. Runs already in `--out` (same settings) are kept,
    not repeated: raise it to add seeds."""
    contenders: tuple[str, ...] = ("ppo.py", "dpo.py", "brax ppo")
    """Which contenders to run now (e.g. only dpo.py, to add its seeds); the table shows every contender in
    `--out`."""
    max_ratio: float = 1 / 1.5
    """The target for our time over Brax's (printed next to the ratios)."""
    out: str = "bench/time_to_return.json"
    """Where to write the table as JSON."""


def parse_flag(preset, flag, script):
    name, value = flag.split("=") if flag.count("=") == 1 else (None, None)
    if not hasattr(preset, name or ""):
        raise SystemExit(f"error: {flag!r} is not name=value with name a field of {script}'s Args ({script} --help)")
    kind = type(getattr(preset, name))
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise SystemExit(f"error: {flag!r}: {name} takes true or false")
        return name, value.lower() == "true"
    try:
        return name, tuple(int(v) for v in value.split(",")) if kind is tuple else kind(value)
    except ValueError:
        wanted = "comma-separated ints" if kind is tuple else f"a value of type {kind.__name__}"
        raise SystemExit(f"error: {flag!r}: {name} takes {wanted}") from None


def parse_flags(module, bench, flags):
    preset = module.resolve_args(module.Args(env=bench.env))  # for the type of each overridden field
    return dict(parse_flag(preset, flag, f"{module.__name__}.py") for flag in flags)


def ours(module, bench, seed, flags):
    overrides = parse_flags(module, bench, flags)
    start = time.perf_counter()  # from checking the flags on, as `python ppo.py` does
    args = module.resolve_args(module.Args(env=bench.env, seed=seed, total_timesteps=bench.budget,
                                           num_evals=bench.evals, num_eval_envs=128, **overrides))  # fmt: skip
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(seed, seed + 1))
    evals = []

    def log_fn(metrics):
        if metrics["evaluated"]:
            evals.append((time.perf_counter() - start, int(metrics["env_steps"]), float(metrics["eval_return"].mean())))

    jax.block_until_ready(
        jax.jit(module.make_train(args, log_fn=log_fn), compiler_options=module.compiler_options())(keys)
    )
    return summarise(evals, bench.target)


def summarise(evals, target):
    reached = [t for t, _, r in evals if r >= target]
    return dict(evals=evals, final_eval=evals[-1][2], seconds_to_target=reached[0] if reached else None)


class TargetReached(Exception):
    """Raised from Brax's progress callback to end its run at the target (or past its time limit)."""


def brax_trainer(bench, seed):
    if not hasattr(jax, "device_put_replicated"):  # brax 0.14.2 still calls it; jax 0.10 removed it
        from jax._src import api

        jax.device_put_replicated = api.device_put_replicated
    from brax import envs
    from brax.training.agents.ppo import networks as brax_networks
    from brax.training.agents.ppo import train as brax_ppo

    evals = []

    def progress_fn(step, metrics):
        evals.append((time.perf_counter() - start, step, float(metrics["eval/episode_reward"])))
        if evals[-1][2] >= bench.target or evals[-1][0] > bench.brax_max_seconds:
            raise TargetReached

    layout = dict(num_envs=512, discounting=0.97, unroll_length=16, batch_size=64, num_minibatches=8)
    if bench.brax_layout == "purejaxrl":
        network_factory = functools.partial(brax_networks.make_ppo_networks, policy_hidden_layer_sizes=(256, 256),
                                            value_hidden_layer_sizes=(256, 256), activation=jax.nn.tanh)  # fmt: skip
        layout = dict(num_envs=2048, discounting=0.99, unroll_length=10, batch_size=64, num_minibatches=32,
                      clipping_epsilon=0.2, max_grad_norm=0.5, network_factory=network_factory)  # fmt: skip
    elif bench.brax_layout == "brax":
        layout = dict(num_envs=4096, discounting=0.97, unroll_length=5, batch_size=2048, num_minibatches=32)
    start = time.perf_counter()
    try:
        brax_ppo.train(
            environment=envs.get_environment(bench.env, backend=bench.brax_backend),
            num_timesteps=bench.brax_budget,
            episode_length=1000,
            learning_rate=3e-4,
            entropy_cost=bench.brax_entropy,
            num_updates_per_batch=4,
            normalize_observations=True,
            **layout,
            reward_scaling=bench.brax_reward_scaling,
            num_evals=bench.brax_evals,
            num_eval_envs=128,
            deterministic_eval=True,
            seed=seed,
            progress_fn=progress_fn,
        )
    except TargetReached:
        pass
    return summarise(evals, bench.target)


def main():
    bench = tyro.cli(Bench, description=__doc__)
    if not bench.brax_ynn:  # before jax starts its backend, so that Brax's own jax.jit sees it too
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type="
    contenders = {"ppo.py": lambda seed: ours(ppo, bench, seed, bench.flags),
                  "dpo.py": lambda seed: ours(dpo, bench, seed, bench.flags + bench.dpo_flags),
                  "brax ppo": lambda seed: brax_trainer(bench, seed)}  # fmt: skip
    unknown = set(bench.contenders) - set(contenders)
    if unknown:
        raise SystemExit(f"error: --contenders {' '.join(sorted(unknown))!r}: choose among {', '.join(contenders)}")
    checked = [(ppo, bench.flags)]  # bad flags fail now, not later; ppo.py's always: Brax's backend follows it
    if "dpo.py" in bench.contenders:  # a ppo.py-only flag (e.g. clip_eps=0.3) with dpo.py left out is fine
        checked.append((dpo, bench.flags + bench.dpo_flags))
    settings = {}  # each script's resolved Args: a preset that changes makes a saved file not resumable
    for module, flags in checked:
        resolved = module.resolve_args(module.Args(env=bench.env, total_timesteps=bench.budget, num_evals=bench.evals,
                                                   **parse_flags(module, bench, flags)))  # fmt: skip
        if f"{module.ALGO}.py" in bench.contenders:
            settings[f"{module.ALGO}.py"] = {k: v for k, v in dataclasses.asdict(resolved).items() if k != "out_dir"}
        if module is ppo and bench.brax_backend is None:  # resolved before --out is read, so a resume compares it
            bench = dataclasses.replace(bench, brax_backend=resolved.backend)
    results, settings = load_json(bench, settings)
    for seed in range(bench.repeats):
        for name in bench.contenders:
            runs = results.setdefault(name, [])
            if seed < len(runs):
                continue  # measured before, with these settings
            runs.append(contenders[name](seed))
            write_json(bench, results, settings)
            r = runs[-1]
            print(f"{name} seed {seed}: final eval {r['final_eval']:.1f}, seconds to target {r['seconds_to_target']}")
            for step_time, step, value in r.get("evals", []):
                print(f"    {step:>10,} steps  eval {value:8.1f}  at {step_time:7.1f} s", flush=True)

    def median_seconds(runs):
        return statistics.median(math.inf if r["seconds_to_target"] is None else r["seconds_to_target"] for r in runs)

    print(f"\n{bench.env}: wall time (compile included) to eval return ≥ {bench.target:g}, median of "
          f"the runs below, on {os.cpu_count()} CPU cores")  # fmt: skip
    print("| trainer | last eval per seed | reached | median seconds to target |\n|---|---|---|---|")
    for name, runs in results.items():
        finals = ", ".join(f"{r['final_eval']:.0f}" for r in runs)
        reached = sum(r["seconds_to_target"] is not None for r in runs)
        print(f"| {name} | {finals} | {reached}/{len(runs)} | {median_seconds(runs):.0f} |")
    brax_s = median_seconds(results["brax ppo"]) if results.get("brax ppo") else None
    for name in [n for n in results if n != "brax ppo" and brax_s is not None]:  # no ratio without Brax's runs
        if math.isinf(brax_s):
            print(f"{name} / brax time: none, Brax's trainer did not reach the target (target ≤ {bench.max_ratio:.2f})")
            continue
        print(f"{name} / brax time: {median_seconds(results[name]) / brax_s:.2f} (target ≤ {bench.max_ratio:.2f})")
    write_json(bench, results, settings)


# What a run depends on (every field but these): a file measured with other values is not resumed.
NOT_RESUME_KEYS = ("repeats", "contenders", "max_ratio", "out")


def load_json(bench, settings):
    """The saved results and every script's settings, saved and now; a SystemExit if the file was measured with
    other bench options or other resolved settings of a script (a preset changed since, say)."""
    if not os.path.exists(bench.out):
        return {}, settings
    with open(bench.out) as f:
        saved = json.load(f)
    mine = dataclasses.asdict(bench)
    keys = [k for k in mine if k not in NOT_RESUME_KEYS]
    differ = [k for k in keys if json.dumps(saved["config"].get(k, mine[k])) != json.dumps(mine[k])]
    for script, now in settings.items():
        then = saved.get("settings", {}).get(script, now)
        differ += [f"{script} {k}" for k in now if json.dumps(then.get(k, now[k])) != json.dumps(now[k])]
    if differ:
        raise SystemExit(f"error: {bench.out} was measured with other {', '.join(differ)}: give another --out")
    return saved["results"], {**saved.get("settings", {}), **settings}


def write_json(bench, results, settings):
    with open(bench.out + ".tmp", "w") as f:
        json.dump(dict(config=dataclasses.asdict(bench), settings=settings, results=results), f, indent=2)
    os.replace(bench.out + ".tmp", bench.out)


if __name__ == "__main__":
    main()

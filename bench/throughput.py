"""Training throughput of ppo.py against Brax's own PPO trainer and the env-only limit, at matched settings.

    python bench/throughput.py --env hopper --num-envs 512 --num-steps 16 --num-minibatches 8 --total-timesteps 1000000

In one process, one after another and `--repeats` times interleaved (so a noisy machine hits all three
alike), it measures: (1) env-only stepping with random actions in a jitted scan, the hard limit;
(2) ppo.py's `train`; (3) brax.training.agents.ppo.train with the same env, backend, num_envs, rollout
length, minibatches, epochs, networks (tanh MLPs, Gaussian policy with state-independent std) and
total steps. The steps/s of (2) and (3) count training alone, without compilation or evaluation (for Brax,
its own training/sps). It prints a table of medians and writes it as JSON.
"""

import dataclasses
import functools
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
import ppo  # noqa: E402


@dataclasses.dataclass
class Bench:
    env: str = "hopper"
    """Brax environment."""
    backend: str | None = None
    """Physics backend (default: ppo.py's preset for the env)."""
    num_envs: int = 512
    """Parallel environments, for all three."""
    num_steps: int = 16
    """Rollout length per update (Brax: unroll_length, with batch_size·num_minibatches = num_envs)."""
    num_minibatches: int = 8
    """Minibatches per epoch."""
    update_epochs: int = 4
    """Epochs per rollout (Brax: num_updates_per_batch)."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden layers of both the policy and the value network."""
    init_std: float = 1.0
    """Initial std of the policy's Gaussian, for both trainers."""
    total_timesteps: int = 1_000_000
    """Environment steps per training run."""
    repeats: int = 3
    """Interleaved repetitions; the table reports medians."""
    skip_brax: bool = False
    """Leave out Brax's trainer (e.g. where it does not import)."""
    brax_ynn: bool = False
    """Leave XLA's YNNPACK fusions on for Brax's trainer (jaxlib's default, as its users run it). Off (the
    default): turned off process-wide, as ppo.py and dpo.py turn them off for themselves (`compiler_options`),
    so that all contenders run on the same compiler settings."""
    out: str = "bench/throughput.json"
    """Where to write the table as JSON."""


def machine():
    """What the figures came from: CPU model, cores, date, jax version."""
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    model = names[0] if names else platform.processor()
    return dict(cpu=model, cores=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M"), jax=jax.__version__)


def compile_then_run(jitted, *inputs):
    """Seconds to compile, seconds to run (compiled, so the run excludes compilation), and the output."""
    start = time.perf_counter()
    compiled = jitted.lower(*inputs).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    output = jax.block_until_ready(compiled(*inputs))
    return compile_s, time.perf_counter() - start, output


def make_env_only(args, steps):
    """run(key): `steps` steps of args.num_envs envs with random actions, in a scan (to be jitted)."""
    env = ppo.make_env(args)

    def run(key):
        state = env.reset(jax.random.split(key, args.num_envs))

        def step(carry, _):
            state, key = carry
            key, action_key = jax.random.split(key)
            action = jax.random.uniform(action_key, (args.num_envs, env.action_size), minval=-1, maxval=1)
            state = env.step(state, action)
            return (state, key), state.reward.mean()

        # The final observations are returned too: where the reward does not depend on the state
        # (inverted_pendulum's is 1 per step), XLA would otherwise drop the physics as dead code.
        (state, _), rewards = jax.lax.scan(step, (state, key), None, steps)
        return rewards.mean(), state.obs

    return run


def env_only(bench, args):
    """Random actions in a jitted scan: the most a trainer on this machine could step."""
    steps = bench.total_timesteps // bench.num_envs
    run = jax.jit(make_env_only(args, steps), compiler_options=ppo.compiler_options())
    compile_s, run_s, _ = compile_then_run(run, jax.random.PRNGKey(1))
    return dict(compile_s=compile_s, run_s=run_s, sps=steps * bench.num_envs / run_s, eval_return=float("nan"))


def ours(bench, args):
    """ppo.py's train; steps/s of training alone, like Brax's training/sps: timed from the end of update 1 to
    the end of the last update before the final evaluation, from the per-update log callback."""
    stamps = []
    train = ppo.make_train(args, log_fn=lambda metrics: stamps.append(time.perf_counter()))
    train = jax.jit(train, compiler_options=ppo.compiler_options())
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(1))
    compile_s, run_s, (_, eval_returns) = compile_then_run(train, keys)
    sps = (len(stamps) - 2) * args.num_envs * args.num_steps / (stamps[-2] - stamps[0])
    return dict(compile_s=compile_s, run_s=run_s, sps=sps, eval_return=float(eval_returns.mean()))


def brax_trainer(bench, args):
    if not hasattr(jax, "device_put_replicated"):  # brax 0.14.2 still calls it; jax 0.10 removed it
        from jax._src import api

        jax.device_put_replicated = api.device_put_replicated
    from brax import envs
    from brax.training.agents.ppo import networks as ppo_networks
    from brax.training.agents.ppo import train as brax_ppo

    network_factory = functools.partial(
        ppo_networks.make_ppo_networks,
        policy_hidden_layer_sizes=args.hidden_sizes,
        value_hidden_layer_sizes=args.hidden_sizes,
        activation=jax.nn.tanh,
        distribution_type="normal",
        noise_std_type="log",
        init_noise_std=args.init_std,
    )
    start = time.perf_counter()
    _, _, metrics = brax_ppo.train(
        environment=envs.get_environment(args.env, backend=args.backend),
        num_timesteps=args.total_timesteps,
        num_envs=args.num_envs,
        episode_length=args.episode_length,
        learning_rate=args.learning_rate,
        entropy_cost=args.ent_coef,
        discounting=args.gamma,
        unroll_length=args.num_steps,
        batch_size=args.num_envs // args.num_minibatches,
        num_minibatches=args.num_minibatches,
        num_updates_per_batch=args.update_epochs,
        normalize_observations=args.normalize_obs,
        reward_scaling=args.reward_scaling,
        clipping_epsilon=args.clip_eps,
        gae_lambda=args.gae_lambda,
        max_grad_norm=args.max_grad_norm or None,  # 0: off
        network_factory=network_factory,
        num_evals=3,
        num_eval_envs=args.num_eval_envs,
        deterministic_eval=True,
        seed=0,
    )
    total_s = time.perf_counter() - start
    # Brax times each training epoch; with num_evals=3 there are two, and the second compiles nothing.
    sps = metrics["training/sps"]
    run_s = args.total_timesteps / sps
    return dict(compile_s=total_s - run_s, run_s=run_s, sps=sps, eval_return=float(metrics["eval/episode_reward"]))


def main():
    bench = tyro.cli(Bench, description=__doc__)
    if not bench.brax_ynn:  # before jax starts its backend, so that Brax's own jax.jit sees it too
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type="
    matched = ("env", "backend", "total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs",
               "hidden_sizes", "init_std")  # fmt: skip
    args = ppo.resolve_args(ppo.Args(**{name: getattr(bench, name) for name in matched}))
    contenders = {"env-only": env_only, "ppo.py": ours}
    if not bench.skip_brax:
        contenders["brax ppo"] = brax_trainer
    results = {name: [] for name in contenders}
    for repeat in range(bench.repeats):
        for name, measure in contenders.items():
            results[name].append(measure(bench, args))
            r = results[name][-1]
            print(f"[{repeat + 1}/{bench.repeats}] {name:9s} compile {r['compile_s']:6.1f} s  run {r['run_s']:7.1f} s  "
                  f"{r['sps']:9,.0f} steps/s  eval {r['eval_return']:8.1f}", flush=True)  # fmt: skip
    table = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()}
    # Each ratio is taken within a repeat, between neighbouring runs, then its median over the repeats: the
    # machine's speed drifts between repeats more than between two runs in a row.
    pairs = {"ppo.py / env-only": "env-only", "ppo.py / brax ppo": "brax ppo"}
    per_repeat = {label: [a["sps"] / b["sps"] for a, b in zip(results["ppo.py"], results[other], strict=True)]
                  for label, other in pairs.items() if other in results}  # fmt: skip
    ratios = {label: statistics.median(values) for label, values in per_repeat.items()}
    print(f"\n{bench.env} ({args.backend}), {bench.num_envs} envs × {bench.num_steps} steps, {bench.num_minibatches} "
          f"minibatches × {bench.update_epochs} epochs, hidden {bench.hidden_sizes}, {bench.total_timesteps:,} steps, "
          f"median of {bench.repeats} on {os.cpu_count()} CPU cores ({platform.machine()})")  # fmt: skip
    print(f"| {'trainer':9s} | compile s | run s  | steps/s | eval return |\n|---|---|---|---|---|")
    for name, r in table.items():
        print(
            f"| {name:9s} | {r['compile_s']:9.1f} | {r['run_s']:6.1f} | {r['sps']:7,.0f} | {r['eval_return']:11.1f} |"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f} (per repeat: {', '.join(f'{v:.2f}' for v in per_repeat[name])})")
    os.makedirs(os.path.dirname(bench.out) or ".", exist_ok=True)
    with open(bench.out + ".tmp", "w") as f:
        json.dump(dict(config=dataclasses.asdict(bench), backend=args.backend, table=table, ratios=ratios,
                       ratios_per_repeat=per_repeat, runs=results, machine=machine()), f, indent=2)  # fmt: skip
    os.replace(bench.out + ".tmp", bench.out)


if __name__ == "__main__":
    main()

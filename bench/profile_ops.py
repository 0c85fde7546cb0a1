"""Where ppo.py's time goes, op by op: one jax.profiler trace of the compiled train, grouped by loop level.

    python bench/profile_ops.py --env inverted_pendulum --hidden-sizes 64 64

With --xla_cpu_enable_xprof_traceme (set here, before jax starts), XLA's CPU runtime records every op it
executes (a fusion, a dot, a sort). An op inside ppo.py's loops runs once per iteration, so its number of
calls tells where it sits: num_updates × update_epochs × num_minibatches calls, a gradient step;
num_updates × num_steps, an env step (acting networks, wrappers); a multiple of that, the physics'
substeps; num_updates × update_epochs, an epoch (the shuffle); num_updates, once per update (the critic
over the rollout, GAE, the normaliser). The table gives each level's op time per update, summed over
threads, so it can exceed the wall time where ops ran side by side; tracing slows small ops most, so the
levels made of many small ops (the physics) read high. Then the costliest ops of one gradient step, with
their HLO (shapes and what they compute), from the compiled module.
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import tyro  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402


@dataclasses.dataclass
class Profile:
    env: str = "inverted_pendulum"
    """Brax environment (its ppo.py preset fills every size not given here)."""
    num_envs: int | None = None
    """Parallel environments."""
    num_steps: int | None = None
    """Rollout length per update."""
    num_minibatches: int | None = None
    """Minibatches per epoch."""
    update_epochs: int | None = None
    """Epochs per update."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layers of the policy and value networks."""
    updates: int = 3
    """Updates in the traced run."""
    ynn: bool = False
    """Profile with XLA's default YNNPACK fusions, which ppo.py turns off on CPUs (`compiler_options`)."""
    top: int = 12
    """Ops of the gradient step to list."""
    out: str = "bench/profile_ops.json"
    """Where to write the tables as JSON."""


def traced_op_times(compiled, keys):
    """Total µs and number of calls of every HLO op in one run of `compiled`."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            jax.block_until_ready(compiled(keys))
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        op = e.get("args", {}).get("hlo_op", "") if e.get("ph") == "X" else ""
        # Loops and branches are recorded too, spanning the ops inside them: count only the ops themselves.
        if op and e["args"].get("hlo_module") == "jit_train" and not op.startswith(("while", "cond", "call")):
            total[op] += e["dur"]
            calls[op] += 1
    return total, calls


def main():
    prof = tyro.cli(Profile, description=__doc__)
    sizes = {k: v for k, v in dataclasses.asdict(prof).items() if k.startswith(("num_", "update_")) and v}
    args = ppo.resolve_args(ppo.Args(env=prof.env, hidden_sizes=prof.hidden_sizes, num_eval_envs=16, **sizes))
    args = ppo.resolve_args(dataclasses.replace(args, total_timesteps=prof.updates * args.num_envs * args.num_steps))
    n_upd, n_epochs = prof.updates, prof.updates * args.update_epochs
    n_grad, n_env = n_epochs * args.num_minibatches, prof.updates * args.num_steps
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(1))
    options = {} if prof.ynn else ppo.compiler_options()
    compiled = jax.jit(ppo.make_train(args), compiler_options=options).lower(keys).compile()
    jax.block_until_ready(compiled(keys))  # warm
    start = time.perf_counter()
    jax.block_until_ready(compiled(keys))
    wall_s = time.perf_counter() - start
    total, calls = traced_op_times(compiled, keys)

    def level(n):
        if n == n_grad:
            return "gradient step"
        if n == n_env:
            return "env step (acting, wrappers)"
        if n % n_env == 0:
            return "physics substep"
        return {n_epochs: "epoch (shuffle)", n_upd: "once per update (critic, GAE)"}.get(n, "other (evaluation)")

    levels = collections.defaultdict(lambda: [0.0, 0, 0])  # µs, ops, calls per op
    for op, us in total.items():
        row = levels[level(calls[op])]
        row[0], row[1], row[2] = row[0] + us, row[1] + 1, calls[op]
    ms_per_update = {name: us / 1e3 / n_upd for name, (us, _, _) in levels.items()}
    all_ms = sum(ms_per_update.values())

    print(f"\n{args.env}, {args.backend}, {args.num_envs} envs × {args.num_steps} steps, {args.num_minibatches} "
          f"minibatches × {args.update_epochs} epochs, hidden {args.hidden_sizes}; {prof.updates} updates in "
          f"{wall_s:.2f} s untraced; YNNPACK fusions {'on' if prof.ynn else 'off'}; {platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")  # fmt: skip
    print("| level | calls per op | ops | op ms per update | share |")
    print("|---|---|---|---|---|")
    table = []
    for name, (_, n_ops, n_calls) in sorted(levels.items(), key=lambda kv: -kv[1][0]):
        share = ms_per_update[name] / all_ms
        print(f"| {name} | {n_calls} | {n_ops} | {ms_per_update[name]:.1f} | {share:.0%} |")
        table.append(dict(level=name, calls_per_op=n_calls, ops=n_ops, ms_per_update=ms_per_update[name], share=share))

    hlo = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", compiled.as_text(), re.M)}
    grad_ops = sorted((op for op in total if calls[op] == n_grad), key=lambda op: -total[op])
    step_us = sum(total[op] for op in grad_ops) / n_grad
    print(f"\nOne gradient step ({args.num_envs * args.num_steps // args.num_minibatches} samples): {len(grad_ops)} "
          f"ops, {step_us / 1e3:.2f} ms; the costliest:\n")  # fmt: skip
    print("| op | µs per call | HLO |")
    print("|---|---|---|")
    top = []
    for op in grad_ops[: prof.top]:
        text = re.sub(r", metadata=\{.*", "", hlo.get(op, "?"))
        text = re.sub(r", backend_config=.*", "", text)[:110]
        print(f"| {op} | {total[op] / n_grad:.0f} | `{text}` |")
        top.append(dict(op=op, us_per_call=total[op] / n_grad, hlo=text))
    with open(prof.out + ".tmp", "w") as f:
        json.dump(dict(args=dataclasses.asdict(args), ynn=prof.ynn, wall_s=wall_s, levels=table,
                       grad_step_ms=step_us / 1e3, grad_step_top=top), f, indent=2)  # fmt: skip
    os.replace(prof.out + ".tmp", prof.out)


if __name__ == "__main__":
    main()

"""What one gradient step of ppo.py costs, and the ceiling it puts on ppo.py / env-only.

    python bench/grad_step.py --throughput bench/throughput_ant_128.json

Reads the setting (env, num_envs, num_steps, minibatches, epochs, hidden sizes) and the measured env-only
steps/s from a `throughput.py` JSON file, then times ppo.py's minibatch update alone: the same networks,
loss and Adam, `update_epochs × num_minibatches` gradient steps on random data in one jitted scan (the
median of `--repeats` calls after compilation). Its matrix products give the arithmetic of a step (forward,
input gradients but the first layer's, weight gradients; both networks), so the table shows how near the
CPU's peak it runs. Then the ceiling: with physics at env-only speed and nothing else but the gradient
steps, ppo.py could train at most at

    ceiling = physics time / (physics time + gradient steps' time)   per update

of env-only's speed. `--variants` times other ways of writing or compiling the same step, to see whether
the step itself can be made cheaper: `flatten` (Adam on one flat vector, optax.flatten), `transposed_wgrad`
(a custom VJP for the dense layers that transposes the activations before the weight gradient, so that
XLA's CPU dot contracts along the fast axis), and `xla:NAME=VALUE` (the scripts' step compiled with one more
XLA option on top of theirs), e.g.

    python bench/grad_step.py --variants ppo.py xla:xla_cpu_prefer_vector_width=512 \
        xla:xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT
"""

import dataclasses
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402


@dataclasses.dataclass
class Bench:
    throughput: str = "bench/throughput_ant_128.json"
    """A throughput.py JSON file: its setting and its env-only steps/s."""
    variants: tuple[str, ...] = ("ppo.py", "flatten", "transposed_wgrad")
    """Ways of writing the step to time: ppo.py (as the scripts do it), flatten, transposed_wgrad, xla:NAME=VALUE."""
    repeats: int = 7
    """Timed calls per variant, interleaved; the table gives medians."""
    out: str = "bench/grad_step.json"
    """Where to write the table as JSON."""


@jax.custom_vjp
def dense_transposed_wgrad(x, kernel, bias):
    return x @ kernel + bias


def _dense_fwd(x, kernel, bias):
    return x @ kernel + bias, (x, kernel)


def _dense_bwd(residuals, g):
    x, kernel = residuals
    x_t = jax.lax.optimization_barrier(x.T)  # a real transpose: the weight gradient becomes a plain x_t @ g
    return g @ kernel.T, x_t @ g, g.sum(0)


dense_transposed_wgrad.defvjp(_dense_fwd, _dense_bwd)


def make_step_scan(args, obs_size, action_size, variant):
    """run(params, minibatches) → params after update_epochs passes over the minibatches, as ppo.py's update."""
    init, policy, value = ppo.make_networks(args, obs_size, action_size)
    if variant == "transposed_wgrad":

        def mlp(params, x):
            layers = params["params"]
            for i in range(len(layers)):
                x = dense_transposed_wgrad(x, layers[f"Dense_{i}"]["kernel"], layers[f"Dense_{i}"]["bias"])
                x = jnp.tanh(x) if i < len(layers) - 1 else x
            return x

        policy = lambda params, obs: (mlp(params["actor"], obs), params["log_std"])
        value = lambda params, obs: mlp(params["critic"], obs)[..., 0]
    optimizer = optax.adam(args.learning_rate, eps=1e-5)
    optimizer = optax.flatten(optimizer) if variant == "flatten" else optimizer

    def loss_fn(params, minibatch):  # ppo.py's loss at ent_coef = 0
        obs, action, old_log_prob, advantages, targets = minibatch
        mean, log_std = policy(params, obs)
        ratio = jnp.exp(ppo.gaussian_log_prob(action, mean, log_std) - old_log_prob)
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = -jnp.mean(ratio * advantages - ppo.ppo_drift(ratio, advantages, args.clip_eps))
        return policy_loss + args.vf_coef * 0.5 * jnp.mean((value(params, obs) - targets) ** 2)

    def run(params, minibatches):
        def step(state, minibatch):
            params, opt_state = state
            grads = jax.grad(loss_fn)(params, minibatch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        def epoch(state, _):
            return jax.lax.scan(step, state, minibatches)[0], None

        (params, _), _ = jax.lax.scan(epoch, (params, optimizer.init(params)), None, args.update_epochs)
        return params

    return init, jax.jit(run, compiler_options={**ppo.compiler_options(), **xla_option(variant)})


def xla_option(variant):
    """{NAME: VALUE} for a variant xla:NAME=VALUE (VALUE as an int or a bool where it reads as one), else {}."""
    if not variant.startswith("xla:"):
        return {}
    name, value = variant.removeprefix("xla:").split("=", 1)
    return {name: int(value) if value.isdigit() else {"true": True, "false": False}.get(value.lower(), value)}


def step_flops(args, obs_size, action_size, minibatch_size):
    """FLOPs of the matrix products of one gradient step: forward, weight gradients, and input gradients of
    every layer but the first, for the policy and the value network."""
    flops = 0
    for out_size in (action_size, 1):
        sizes = (obs_size, *args.hidden_sizes, out_size)
        macs = [a * b for a, b in zip(sizes, sizes[1:], strict=False)]
        flops += 2 * minibatch_size * (3 * sum(macs) - macs[0])
    return flops


def main():
    bench = tyro.cli(Bench, description=__doc__)
    for variant in bench.variants:
        if variant not in ("ppo.py", "flatten", "transposed_wgrad") and not re.fullmatch(r"xla:\w+=.+", variant):
            allowed = "ppo.py, flatten, transposed_wgrad or xla:NAME=VALUE"
            raise SystemExit(f"error: unknown variant {variant!r}; choose {allowed}")
    try:
        with open(bench.throughput) as f:
            measured = json.load(f)
        env_only_sps = measured["table"]["env-only"]["sps"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: --throughput {bench.throughput!r} is not a throughput.py JSON file ({e!r})") from None
    setting = {k: v for k, v in measured["config"].items() if k in ppo.Args.__dataclass_fields__}
    setting["hidden_sizes"] = tuple(setting["hidden_sizes"])
    args = ppo.resolve_args(ppo.Args(**setting))
    env = ppo.make_env(args)
    obs_size = jax.eval_shape(env.unwrapped.reset, jax.random.PRNGKey(0)).obs.shape[-1]
    batch = args.num_envs * args.num_steps
    mb, steps = batch // args.num_minibatches, args.update_epochs * args.num_minibatches
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    shape = (args.num_minibatches, mb)
    obs = jax.random.normal(keys[0], (*shape, obs_size))
    actions = jax.random.normal(keys[1], (*shape, env.action_size))
    minibatches = (obs, actions, *(jax.random.normal(k, shape) for k in keys[2:5]))  # log-probs, advantages, targets

    compiled = {}
    for variant in bench.variants:
        init, run = make_step_scan(args, obs_size, env.action_size, variant)
        params = jax.jit(init)(keys[5])
        compiled[variant] = (run.lower(params, minibatches).compile(), params)
        jax.block_until_ready(compiled[variant][0](params, minibatches))  # warm
    seconds = {variant: [] for variant in bench.variants}
    for _ in range(bench.repeats):  # interleaved, so that the machine's drift hits every variant alike
        for variant, (run, params) in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(run(params, minibatches))
            seconds[variant].append(time.perf_counter() - start)

    physics_s = batch / env_only_sps  # per update
    flops = step_flops(args, obs_size, env.action_size, mb)
    print(f"\n{args.env}: {steps} gradient steps of {mb} samples per update, hidden {args.hidden_sizes}, "
          f"{flops / 1e6:.0f} MFLOP of matrix products a step; physics {physics_s * 1e3:.0f} ms per update "
          f"at env-only's {env_only_sps:,.0f} steps/s ({bench.throughput}); {os.cpu_count()} CPU cores")  # fmt: skip
    print("| variant | ms per step | GFLOP/s | ms per update | ceiling on ppo.py / env-only |\n|---|---|---|---|---|")
    rows = []
    for variant, times in seconds.items():
        step_s = statistics.median(times) / steps
        ceiling = physics_s / (physics_s + steps * step_s)
        rows.append(dict(variant=variant, ms_per_step=step_s * 1e3, gflops=flops / step_s / 1e9,
                         ms_per_update=steps * step_s * 1e3, ceiling=ceiling))  # fmt: skip
        print(f"| {variant} | {step_s * 1e3:.3f} | {flops / step_s / 1e9:.0f} | {steps * step_s * 1e3:.0f} | "
              f"{ceiling:.2f} |")  # fmt: skip
    with open(bench.out + ".tmp", "w") as f:
        json.dump(dict(config=dataclasses.asdict(bench), args=dataclasses.asdict(args), flops_per_step=flops,
                       physics_ms_per_update=physics_s * 1e3, rows=rows), f, indent=2)  # fmt: skip
    os.replace(bench.out + ".tmp", bench.out)


if __name__ == "__main__":
    main()

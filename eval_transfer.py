"""PPO vs DPO vs LPO across Brax environments, in one command: the comparison "Discovered Policy Optimisation"
(Lu et al., NeurIPS 2022) makes, with confidence intervals and figures.

Every (env, algo) cell trains all seeds vmapped in one compile, with the env's preset (PRESETS below), the
same budget and the same seeds for every algo: the inner loop is ppo.py's, and nothing but the drift
differs. An LPO drift meta-learned by lpo_meta.py on one env is applied unchanged to every env listed, so
the envs it never saw measure transfer.

    python eval_transfer.py --envs hopper walker2d halfcheetah ant --algos ppo dpo lpo \\
        --drift runs/<meta-run>/drift.msgpack --num-seeds 4

Each cell is saved to {results-dir}/cells/ as soon as it finishes, and re-running the same command skips
finished cells, so an interrupted evaluation resumes. Outputs in --results-dir: results.csv and
results.json (env, algo, seed, eval_return), results.md (mean final return per cell with a 95% bootstrap
interval and the ratio to PPO), curves.png (training return per env and algo) and drifts.png
(∂(r·Â − D)/∂r over (r, Â) for PPO, DPO and the LPO drift).
"""

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from brax import envs
from brax.envs.wrappers.training import AutoResetWrapper, EpisodeWrapper, VmapWrapper
from flax import linen as nn
from flax import serialization

ALGOS = ("ppo", "dpo", "lpo")


@dataclasses.dataclass
class Args:
    envs: list[str] = dataclasses.field(default_factory=lambda: ["hopper", "walker2d", "halfcheetah", "ant"])
    """Brax environments; each uses its own preset (PRESETS below) for the fields left at None."""
    algos: list[str] = dataclasses.field(default_factory=lambda: ["ppo", "dpo"])
    """Algorithms to compare: ppo, dpo, lpo (lpo needs --drift)."""
    drift: str | None = None
    """LPO drift written by lpo_meta.py (drift.msgpack); its ppo_init, temporal and clip_eps come with it."""
    results_dir: str = "runs/transfer"
    """Output folder: cells/ (one result file per env and algo), results.*, curves.png, drifts.png."""
    backend: str | None = None
    """Physics backend: spring, positional, generalized or mjx (preset: the fastest on CPU)."""
    seed: int = 0
    """Seed of the first run; run i uses seed + i."""
    num_seeds: int = 1
    """Independent runs, vmapped in one compile."""
    total_timesteps: int | None = None
    """Environment steps per run (action repeats included)."""
    num_envs: int | None = None
    """Parallel environments per run."""
    num_steps: int | None = None
    """Rollout length per environment between two updates."""
    num_minibatches: int | None = None
    """Minibatches each rollout is split into, per epoch."""
    update_epochs: int | None = None
    """Passes over each rollout."""
    learning_rate: float | None = None
    """Adam step size."""
    anneal_lr: bool = False
    """Decay the learning rate linearly to zero over training."""
    gamma: float | None = None
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE λ."""
    clip_eps: float = 0.2
    """PPO's clipping range ε: the drift is zero for r in [1 − ε, 1 + ε]."""
    dpo_alpha: float = 2.0
    """DPO's α: for Â ≥ 0 the objective is capped smoothly at Â + α."""
    dpo_beta: float = 0.6
    """DPO's β: for Â < 0 it sets how far below r = 1 the rollback begins."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient. 0: with a state-independent std the bonus only inflates the action noise."""
    vf_coef: float = 0.5
    """Value loss coefficient (the value loss is 0.5·MSE)."""
    max_grad_norm: float | None = None
    """Global gradient norm clip (None: off, as in the authors' Brax settings; with reward scaling the value
    loss's gradient would dominate the norm and shrink the policy's steps)."""
    reward_scaling: float | None = None
    """Rewards are multiplied by this for learning (reported returns are unscaled)."""
    normalize_rewards: bool = True
    """Divide rewards, for learning only, by the running std of the envs' discounted returns (no mean subtracted),
    updated every step, and clip them to [-10, 10]; --no-normalize-rewards learns from the scaled rewards."""
    vf_clip: float | None = None
    """Clip each value update: the loss is the larger squared error of V and of V_old + clip(V − V_old, ±vf_clip)
    (None: off)."""
    normalize_obs: bool = True
    """Normalise observations with running statistics, clipped to [-5, 5]."""
    episode_length: int = 1000
    """Time limit of an episode, in environment steps; reaching it is a truncation, not a terminal state."""
    action_repeat: int | None = None
    """Environment steps per action."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the policy and of the value network (tanh)."""
    init_std: float = 1.0
    """Initial std of the policy's Gaussian (learnt, state-independent)."""
    tanh_squash: bool = False
    """Squash the Gaussian's sample into the action range [-1, 1] by tanh instead of clipping it there. Either
    way log-probabilities and ratios are those of the Gaussian sample."""
    num_eval_envs: int = 128
    """Environments in each deterministic evaluation (one full episode each, the mean action)."""
    num_evals: int = 1
    """Evaluations, evenly spaced over training, the last at the end (at most one per update)."""
    log_every: int = 10
    """Print and record metrics every this many updates."""
    num_bootstrap: int = 10_000
    """Bootstrap resamples for the 95% confidence intervals of results.md."""
    env: tyro.conf.Suppress[str] = "ant"
    """The env of one cell, set from --envs (not a command-line option)."""
    algo: tyro.conf.Suppress[str] = "ppo"
    """The algorithm of one cell, set from --algos (not a command-line option)."""


# Per-env settings for every Args field left at None. ant, humanoid, halfcheetah, walker2d and reacher are the
# authors' Brax settings; the other envs follow their pattern. Per update: 32 minibatches of `batch` trajectories
# of `unroll` steps, which Brax collects as short unrolls and this file as one rollout of num_steps = batch·32·unroll
# / num_envs steps per env (same data, same minibatch size, GAE over the whole rollout). ent_coef = 0: the authors'
# entropy costs suit Brax's tanh-Gaussian; this Gaussian's std is state-independent and learns best without a bonus.
# ant's reward scale is 1, not their 10: a tanh value network reaches returns of ~100 far sooner than ~1,000.
PRESET_FIELDS = ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "learning_rate",
                 "gamma", "reward_scaling", "action_repeat", "backend")  # fmt: skip
# fmt: off
PRESETS = {  #                 steps    envs  num_steps mbs epochs lr    gamma  reward repeat backend
    "ant":                      (30_000_000,  2048, 80,  32, 4, 3e-4, 0.97,  1.0,  1, "spring"),
    "humanoid":                 (50_000_000,  2048, 160, 32, 8, 3e-4, 0.97,  0.1,  1, "spring"),
    "halfcheetah":              (100_000_000, 2048, 160, 32, 8, 3e-4, 0.95,  1.0,  1, "spring"),
    "walker2d":                 (50_000_000,  2048, 80,  32, 8, 3e-4, 0.97,  0.1,  1, "spring"),
    "reacher":                  (100_000_000, 2048, 200, 32, 8, 3e-4, 0.95,  5.0,  4, "spring"),
    "hopper":                   (10_000_000,  2048, 80,  32, 8, 3e-4, 0.97,  1.0,  1, "spring"),
    "humanoidstandup":          (100_000_000, 2048, 160, 32, 8, 3e-4, 0.97,  0.1,  1, "spring"),
    "inverted_pendulum":        (2_000_000,   2048, 80,  32, 4, 3e-4, 0.97,  1.0,  1, "spring"),
    "inverted_double_pendulum": (20_000_000,  2048, 80,  32, 4, 3e-4, 0.97,  1.0,  1, "spring"),
    "pusher":                   (50_000_000,  2048, 240, 32, 8, 3e-4, 0.95,  5.0,  1, "spring"),
    "swimmer":                  (50_000_000,  2048, 80,  32, 8, 3e-4, 0.995, 1.0,  1, "generalized"),
    "fast":                     (1_000_000,   2048, 80,  32, 4, 3e-4, 0.97,  1.0,  1, "spring"),
}
# fmt: on
BACKENDS = ("spring", "positional", "generalized", "mjx")


def resolve_args(args: Args) -> Args:
    """Fill unset fields from the env's preset and check every value, before anything is compiled."""

    def fail(message):
        raise SystemExit(f"error: {message}")

    if args.env not in PRESETS:
        fail(f"unknown env {args.env!r}; choose one of: {', '.join(PRESETS)}")
    preset = dict(zip(PRESET_FIELDS, PRESETS[args.env], strict=True))
    args = dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
    if args.backend not in BACKENDS:
        fail(f"unknown backend {args.backend!r}; choose one of: {', '.join(BACKENDS)}")
    try:
        envs.get_environment(args.env, backend=args.backend)
    except Exception as e:  # brax raises ValueError/KeyError for backends an env lacks
        fail(f"env {args.env!r} does not support backend {args.backend!r} ({e})")
    positive_floats = ("learning_rate", "reward_scaling", "init_std", "max_grad_norm", "vf_clip")  # None: off
    for name, value in dataclasses.asdict(args).items():  # every count and size, and these floats
        if (type(value) is int and name != "seed" or name in positive_floats and value is not None) and not value > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not (0 < args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        fail(f"--gamma must be in (0, 1] and --gae-lambda in [0, 1], got {args.gamma} and {args.gae_lambda}")
    batch = args.num_envs * args.num_steps
    if batch % args.num_minibatches:
        fail(f"num_envs·num_steps = {args.num_envs}·{args.num_steps} = {batch} is not divisible by "
             f"--num-minibatches {args.num_minibatches}")  # fmt: skip
    per_update = batch * args.action_repeat
    if args.total_timesteps < per_update:
        fail(f"--total-timesteps {args.total_timesteps} is less than one update "
             f"(num_envs·num_steps·action_repeat = {per_update})")  # fmt: skip
    if args.num_evals > args.total_timesteps // per_update:
        fail(f"--num-evals {args.num_evals} is more than the {args.total_timesteps // per_update} updates "
             f"(at most one evaluation per update)")  # fmt: skip
    if any(h <= 0 for h in args.hidden_sizes):
        fail(f"--hidden-sizes must be positive, got {args.hidden_sizes}")
    return args


# ---------------------------------------------------------------------------------------------------
# Networks: separate policy and value MLPs; a Gaussian policy with a state-independent log-std, squashed
# by tanh into the action range [-1, 1]. Ratios and log-probabilities are taken before the squash, where
# its Jacobian cancels in r = π_θ(a|s) / π_old(a|s).


def scaled_init(gain):
    """Weights of variance gain²/fan_in: the scale of an orthogonal init with that gain, without its QR
    decomposition, which vmapped over seeds can deadlock XLA's CPU thread pool (jaxlib 0.10)."""
    return nn.initializers.variance_scaling(gain**2, "fan_in", "normal")


class MLP(nn.Module):
    hidden_sizes: tuple[int, ...]
    out_size: int
    out_scale: float  # init gain of the last layer: small for the policy mean

    @nn.compact
    def __call__(self, x):
        for size in self.hidden_sizes:
            x = nn.tanh(nn.Dense(size, kernel_init=scaled_init(np.sqrt(2)))(x))
        return nn.Dense(self.out_size, kernel_init=scaled_init(self.out_scale))(x)


def make_networks(args, obs_size, action_size):
    actor = MLP(args.hidden_sizes, action_size, 0.01)
    critic = MLP(args.hidden_sizes, 1, 1.0)

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "actor": actor.init(k1, jnp.zeros(obs_size)),
            "log_std": jnp.full(action_size, jnp.log(args.init_std)),
            "critic": critic.init(k2, jnp.zeros(obs_size)),
        }

    def policy(params, obs):
        return actor.apply(params["actor"], obs), params["log_std"]

    def value(params, obs):
        return critic.apply(params["critic"], obs)[..., 0]

    return init, policy, value


def env_action(x, tanh_squash=True):
    """A Gaussian sample (or mean) → an action in [-1, 1]."""
    return jnp.tanh(x) if tanh_squash else jnp.clip(x, -1.0, 1.0)


def gaussian_log_prob(x, mean, log_std):
    return jnp.sum(-0.5 * ((x - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


# ---------------------------------------------------------------------------------------------------
# The drifts: the one piece that differs between the algorithms. D ≥ 0, D(1, A) = 0 and ∂D/∂r(1, A) = 0.


def ppo_drift(ratio, advantages, clip_eps=0.2):
    """D_PPO(r, A) = ReLU((r − clip(r, 1 − ε, 1 + ε))·A), so that r·A − D = min(r·A, clip(r)·A)."""
    return jax.nn.relu((ratio - jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)) * advantages)


def dpo_drift(ratio, advantages, alpha=2.0, beta=0.6):
    """DPO's drift, branching on the sign of the (normalised) advantage:
    A ≥ 0: ReLU((r − 1)·A − α·tanh((r − 1)·A / α)), which caps r·A − D smoothly at A + α;
    A < 0: ReLU(log(r)·A − β·tanh(log(r)·A / β)), whose objective has an interior maximum r* < 1, so
    ratios pushed below r* are pulled back up ("rollback")."""
    x_pos = (ratio - 1.0) * advantages
    # log of a ratio kept ≥ the smallest normal float: r = 0 (log r < -87 underflows) would give NaN gradients,
    # through either branch of the where
    x_neg = jnp.log(jnp.maximum(ratio, jnp.finfo(ratio.dtype).tiny)) * advantages
    positive = jax.nn.relu(x_pos - alpha * jnp.tanh(x_pos / alpha))
    negative = jax.nn.relu(x_neg - beta * jnp.tanh(x_neg / beta))
    return jnp.where(advantages >= 0, positive, negative)


class DriftNetwork(nn.Module):
    """LPO's f_φ: Dense(128, no bias) → tanh → Dense(1, no bias); zero features give f = 0."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(128, use_bias=False)(x))
        return nn.Dense(1, use_bias=False)(x)[..., 0]


def lpo_features(ratio, advantages, progress, temporal):
    """The 8 features of LPO, each zero at r = 1; a temporal drift appends progress·x (16 in all)."""
    # log r of a ratio kept ≥ the smallest normal float: r = 0 (log r < -87 underflows) would give NaN gradients
    log_r, one_minus_r = jnp.log(jnp.maximum(ratio, jnp.finfo(ratio.dtype).tiny)), 1.0 - ratio
    x = jnp.stack([log_r, log_r**2, one_minus_r, one_minus_r**2, advantages * log_r, advantages * log_r**2,
                   advantages * one_minus_r, advantages * one_minus_r**2], axis=-1)  # fmt: skip
    if temporal:
        x = jnp.concatenate([x, progress * x], axis=-1)
    return x


def lpo_drift(drift_params, ratio, advantages, progress, ppo_init, clip_eps, temporal):
    """D = ReLU(f_φ(x) − 1e-4), or ReLU(D_PPO + f_φ(x) − 1e-4) with PPO initialisation."""
    f = DriftNetwork().apply(drift_params, lpo_features(ratio, advantages, progress, temporal))
    base = ppo_drift(ratio, advantages, clip_eps) if ppo_init else 0.0
    return jax.nn.relu(base + f - 1e-4)


def init_drift_params(key, temporal=False):
    """Where the ES mean starts: output layer zero, so f ≡ 0 and generation 0 is PPO (with ppo_init), hidden
    layer random. Not all zero: tanh is odd and there are no biases, so θ and −θ give the same drift; at θ = 0
    every antithetic pair scores the same and the ES gradient is exactly zero, a saddle it would never leave."""
    params = DriftNetwork().init(key, jnp.zeros(16 if temporal else 8))["params"]
    return {"params": {"Dense_0": params["Dense_0"], "Dense_1": jax.tree.map(jnp.zeros_like, params["Dense_1"])}}


def load_drift(path, temporal=None):
    """Returns (drift_params, config) of a drift.msgpack. The parameters must have the shapes of the drift
    network for `temporal` (None: the file's own flag); else, or if unreadable, SystemExit("error: ...")."""
    try:
        with open(path, "rb") as f:
            blob = serialization.msgpack_restore(f.read())
        config, params = json.loads(blob["config"]), blob["params"]
        temporal = config["temporal"] if temporal is None else temporal
        shapes = jax.tree.map(np.shape, params)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: cannot read a drift from {path} ({e})") from None
    expected = jax.tree.map(np.shape, init_drift_params(jax.random.PRNGKey(0), temporal))
    if shapes != expected:
        raise SystemExit(f"error: {path} holds a drift of shapes {shapes}, expected {expected} (temporal={temporal})")
    return jax.tree.map(jnp.asarray, params), config


def make_drift_fn(args):
    """The drift of args.algo as drift_fn(ratio, advantages, progress), progress = n/N the fraction of training
    done (only a temporal LPO drift reads it). LPO's network and its config come from the file args.drift."""
    if args.algo == "ppo":
        return lambda ratio, advantages, progress: ppo_drift(ratio, advantages, args.clip_eps)
    if args.algo == "dpo":
        return lambda ratio, advantages, progress: dpo_drift(ratio, advantages, args.dpo_alpha, args.dpo_beta)
    params, config = check_drift_file(args.drift)  # ppo_init, clip_eps, temporal: as it was meta-trained
    return lambda ratio, advantages, progress: lpo_drift(
        params, ratio, advantages, progress, config["ppo_init"], config["clip_eps"], config["temporal"]
    )


def check_drift_file(path):
    """(params, config) of an LPO drift file; a one-line SystemExit if it is missing, malformed or mis-shaped."""
    params, config = load_drift(path)
    missing = [k for k in ("env", "ppo_init", "clip_eps", "temporal") if k not in config]
    if missing:
        raise SystemExit(f"error: {path}: the drift's config lacks {', '.join(missing)} (not lpo_meta.py's?)")
    return params, config


# ---------------------------------------------------------------------------------------------------
# Observation normalisation: one running mean and variance shared by all envs, saved with the policy.


class ObsStats(NamedTuple):
    count: jax.Array
    mean: jax.Array
    var: jax.Array


def init_obs_stats(obs_size):
    return ObsStats(jnp.zeros(()), jnp.zeros(obs_size), jnp.ones(obs_size))


def update_obs_stats(stats, obs):
    """Merge a batch of observations (any leading shape) into the running statistics (Chan et al.)."""
    obs = obs.reshape(-1, stats.mean.shape[-1])
    n = obs.shape[0]
    count = stats.count + n
    delta = obs.mean(0) - stats.mean
    mean = stats.mean + delta * n / count
    m2 = stats.var * stats.count + obs.var(0) * n + delta**2 * stats.count * n / count
    return ObsStats(count, mean, m2 / count)


def normalize_obs(stats, obs, enabled=True):
    if not enabled:
        return obs
    return jnp.clip((obs - stats.mean) / jnp.sqrt(stats.var + 1e-8), -5.0, 5.0)


# ---------------------------------------------------------------------------------------------------
# Environment: Brax's episode and auto-reset wrappers, plus the true last observation of each episode.


class KeepFinalObs(envs.Wrapper):
    """Keeps each step's observation in info["final_obs"] before the auto-reset overwrites it, so the
    value of the state reached at a time-out can be bootstrapped: a time-out is not a terminal state."""

    def reset(self, rng):
        state = self.env.reset(rng)
        state.info["final_obs"] = state.obs
        return state

    def step(self, state, action):
        state = self.env.step(state, action)
        state.info["final_obs"] = state.obs
        return state


def make_env(args, auto_reset=True):
    env = envs.get_environment(args.env, backend=args.backend)
    env = EpisodeWrapper(VmapWrapper(env), args.episode_length, args.action_repeat)
    return AutoResetWrapper(KeepFinalObs(env)) if auto_reset else env


# ---------------------------------------------------------------------------------------------------
# GAE. `terminations` stop bootstrapping (the value after a terminal state is zero); `dones` (terminal
# or time-out) only cut the advantage recursion, so a time-out still bootstraps from V(final obs).


def compute_gae(rewards, values, next_values, terminations, dones, gamma, gae_lambda):
    deltas = rewards + gamma * (1.0 - terminations) * next_values - values

    def backward(advantage, step):
        delta, done = step
        advantage = delta + gamma * gae_lambda * (1.0 - done) * advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(deltas[0]), (deltas, dones), reverse=True)
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------------------
# Evaluation: the mean action, one full episode on each of num_eval_envs envs.


def make_evaluate(args, policy):
    env = make_env(args, auto_reset=False)

    def evaluate(params, obs_stats, key):
        state = env.reset(jax.random.split(key, args.num_eval_envs))

        def step(carry, _):
            state, total, alive = carry
            mean, _ = policy(params, normalize_obs(obs_stats, state.obs, args.normalize_obs))
            state = env.step(state, env_action(mean, args.tanh_squash))
            total = total + jnp.where(alive, state.reward, 0.0)
            return (state, total, alive & (state.done == 0)), None

        init = (state, jnp.zeros(args.num_eval_envs), jnp.ones(args.num_eval_envs, bool))
        (_, total, _), _ = jax.lax.scan(step, init, None, -(-args.episode_length // args.action_repeat))
        return total

    return evaluate


# ---------------------------------------------------------------------------------------------------
# Training: ppo.py's loop with the drift of args.algo (make_drift_fn); all seeds vmapped in one scan.


def shuffled_indices(key, n):
    """A random permutation of range(n), for the minibatches. XLA's CPU sort is 4-14x faster on one uint32
    array than on the key-value pairs jax.random.permutation sorts (bench/shuffle.py), so each index rides in
    the low bits of a random key. Indices whose random bits tie keep their order (runs of ~n / 2^(32 -
    index_bits), ~10 at n = 163,840): a sample's minibatch stays uniformly random, tied ones just tend to
    share it. Past 2^20 samples too few random bits are left, so the exact shuffle is used."""
    index_bits = max(1, (n - 1).bit_length())
    if index_bits > 20:
        return jax.random.permutation(key, n)
    keys = jax.random.bits(key, (n,)) >> index_bits << index_bits | jnp.arange(n, dtype=jnp.uint32)
    return (jnp.sort(keys) & (2**index_bits - 1)).astype(jnp.int32)


class Transition(NamedTuple):
    obs: jax.Array  # normalised with the statistics the rollout acted on
    action: jax.Array  # the Gaussian sample, before the tanh squash or the clip
    log_prob: jax.Array
    reward: jax.Array  # times reward_scaling, then normalised (normalize_rewards)
    termination: jax.Array
    done: jax.Array


class RunnerState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    obs_stats: ObsStats
    return_stats: ObsStats  # of the discounted return, for reward normalisation
    discounted: jax.Array  # per env: its discounted return so far
    env_state: envs.State
    last_return: jax.Array  # per env: the return of its last finished episode
    finished: jax.Array  # per env: has it finished an episode yet
    key: jax.Array


def make_train(args, log_fn=None):
    """Returns train(keys) → (final runner state per seed, eval returns per seed and env).
    Every seed learns with drift_fn(ratio, advantages, n/N): the drift of args.algo (make_drift_fn).

    `keys` holds one PRNG key per seed; every seed is vmapped. `log_fn(metrics)` is called from inside
    the jitted loop after every update with a dict of per-seed arrays (None: no logging)."""
    env = make_env(args)
    # The observation size from the shapes alone: brax's env.observation_size runs a reset op by op (~9 s).
    obs_size = jax.eval_shape(env.unwrapped.reset, jax.random.PRNGKey(0)).obs.shape[-1]
    init_params, policy, value = make_networks(args, obs_size, env.action_size)
    evaluate = make_evaluate(args, policy)
    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_updates = args.total_timesteps // (batch_size * args.action_repeat)
    num_grad_steps = num_updates * args.update_epochs * args.num_minibatches
    lr = optax.linear_schedule(args.learning_rate, 0.0, num_grad_steps) if args.anneal_lr else args.learning_rate
    optimizer = optax.adam(lr, eps=1e-5)
    if args.max_grad_norm is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optimizer)
    drift_fn = make_drift_fn(args)  # ppo, dpo or lpo: the one thing that differs between the algos

    def init_runner(key):
        key, params_key, env_key = jax.random.split(key, 3)
        params = init_params(params_key)
        env_state = env.reset(jax.random.split(env_key, args.num_envs))
        obs_stats = update_obs_stats(init_obs_stats(obs_size), env_state.obs)
        zeros = jnp.zeros(args.num_envs)
        return RunnerState(params, optimizer.init(params), obs_stats, init_obs_stats(1), zeros, env_state, zeros,
                           zeros > 0, key)  # fmt: skip

    def env_step(runner, _):
        key, action_key = jax.random.split(runner.key)
        obs = normalize_obs(runner.obs_stats, runner.env_state.obs, args.normalize_obs)
        mean, log_std = policy(runner.params, obs)
        action = mean + jnp.exp(log_std) * jax.random.normal(action_key, mean.shape)
        env_state = env.step(runner.env_state, env_action(action, args.tanh_squash))
        done = env_state.done
        reward = env_state.reward * args.reward_scaling
        discounted = runner.discounted * args.gamma + reward
        return_stats = runner.return_stats
        if args.normalize_rewards:  # statistics of every env's return so far; clipped while they are young
            return_stats = update_obs_stats(return_stats, discounted[:, None])
            reward = jnp.clip(reward * jax.lax.rsqrt(return_stats.var[0] + 1e-8), -10.0, 10.0)
        episode_done = env_state.info["episode_done"] > 0
        transition = Transition(
            obs=obs,
            action=action,
            log_prob=gaussian_log_prob(action, mean, log_std),
            reward=reward,
            termination=done * (1.0 - env_state.info["truncation"]),
            done=done,
        )
        last_return = jnp.where(episode_done, env_state.info["episode_metrics"]["sum_reward"], runner.last_return)
        runner = runner._replace(env_state=env_state, return_stats=return_stats, discounted=discounted * (1.0 - done),
                                 last_return=last_return, finished=runner.finished | episode_done, key=key)  # fmt: skip
        return runner, (transition, env_state.info["final_obs"])

    def update_seed(runner, update):
        runner, (batch, final_obs) = jax.lax.scan(env_step, runner, None, args.num_steps)
        # The critic runs once over the whole rollout (larger matrix products than step by step); V of the
        # true next state bootstraps time-outs.
        values = value(runner.params, batch.obs)
        next_values = value(runner.params, normalize_obs(runner.obs_stats, final_obs, args.normalize_obs))
        advantages, targets = compute_gae(
            batch.reward, values, next_values, batch.termination, batch.done, args.gamma, args.gae_lambda
        )

        def loss_fn(params, minibatch):
            transition, advantages, targets, old_values = minibatch
            mean, log_std = policy(params, transition.obs)
            log_ratio = gaussian_log_prob(transition.action, mean, log_std) - transition.log_prob
            ratio = jnp.exp(log_ratio)
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            drift = drift_fn(ratio, advantages, update / num_updates)
            policy_loss = -jnp.mean(ratio * advantages - drift)
            new_values = value(params, transition.obs)
            value_loss = (new_values - targets) ** 2
            if args.vf_clip is not None:
                clipped = old_values + jnp.clip(new_values - old_values, -args.vf_clip, args.vf_clip)
                value_loss = jnp.maximum(value_loss, (clipped - targets) ** 2)
            value_loss = 0.5 * jnp.mean(value_loss)
            entropy = jnp.sum(log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e))  # of the Gaussian, before the squash
            loss = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy
            approx_kl = jnp.mean((ratio - 1.0) - log_ratio)
            return loss, dict(policy_loss=policy_loss, value_loss=value_loss, entropy=entropy,
                              approx_kl=approx_kl, drift=jnp.mean(drift))  # fmt: skip

        def minibatch_step(state, minibatch):
            params, opt_state = state
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, minibatch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), dict(loss=loss, **metrics)

        def epoch(state, key):
            order = shuffled_indices(key, batch_size)
            shuffle = lambda x: x.reshape(batch_size, *x.shape[2:])[order].reshape(
                args.num_minibatches, minibatch_size, *x.shape[2:]
            )
            minibatches = jax.tree.map(shuffle, (batch, advantages, targets, values))
            return jax.lax.scan(minibatch_step, state, minibatches)

        key, epoch_key = jax.random.split(runner.key)
        epoch_keys = jax.random.split(epoch_key, args.update_epochs)
        (params, opt_state), metrics = jax.lax.scan(epoch, (runner.params, runner.opt_state), epoch_keys)
        obs_stats = update_obs_stats(runner.obs_stats, final_obs) if args.normalize_obs else runner.obs_stats
        runner = runner._replace(params=params, opt_state=opt_state, obs_stats=obs_stats, key=key)
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["train_return"] = jnp.sum(runner.last_return * runner.finished) / jnp.maximum(runner.finished.sum(), 1)
        metrics["episodes_finished"] = runner.finished.mean()
        return runner, metrics

    def train(keys):
        runners = jax.vmap(init_runner)(keys)
        eval_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)  # every evaluation starts alike
        evaluate_all = lambda runners: jax.vmap(evaluate)(runners.params, runners.obs_stats, eval_keys)

        def update_all(carry, update):
            runners, eval_returns = carry
            runners, metrics = jax.vmap(update_seed, in_axes=(0, None))(runners, update)
            due = (update + 1) * args.num_evals // num_updates > update * args.num_evals // num_updates
            eval_returns = jax.lax.cond(due, evaluate_all, lambda _: eval_returns, runners)
            if log_fn is not None:
                env_steps = (update + 1) * batch_size * args.action_repeat
                jax.debug.callback(log_fn, dict(update=update + 1, env_steps=env_steps, evaluated=due,
                                                eval_return=eval_returns.mean(-1), **metrics))  # fmt: skip
            return (runners, eval_returns), None

        not_yet = jnp.zeros((keys.shape[0], args.num_eval_envs))
        (runners, eval_returns), _ = jax.lax.scan(update_all, (runners, not_yet), jnp.arange(num_updates))
        return runners, eval_returns

    return train


def compiler_options():
    """XLA options for jax.jit: on CPUs, no YNNPACK fusions. jaxlib 0.10's XLA hands small fusions and matrix
    products to YNNPACK by default, which ran Brax's physics 1.6-1.8x and whole training runs 1.2-1.8x slower
    than XLA's own CPU kernels (bench/README.md). Other backends: none."""
    return {"xla_cpu_experimental_ynn_fusion_type": ""} if jax.default_backend() == "cpu" else {}


# ---------------------------------------------------------------------------------------------------
# Cells: one (env, algo) pair, all seeds; saved when finished, skipped when already saved with the same config.


def atomic_write(path, data: bytes):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Logger:
    """Receives per-update metrics from inside the jitted loop (via jax.debug.callback)."""

    def __init__(self, args, out_dir, wandb_run=None):
        self.args, self.wandb_run, self.rows, self.error, self.diverged_at = args, wandb_run, [], None, None
        self.csv_path = os.path.join(out_dir, "metrics.csv")
        self.start = self.last_time = self.last_steps = None
        self.steps_per_update = args.num_envs * args.num_steps * args.action_repeat

    def __call__(self, metrics):
        metrics = {k: np.asarray(v) for k, v in metrics.items()}
        update, env_steps = int(metrics.pop("update")), int(metrics.pop("env_steps"))
        eval_return = metrics.pop("eval_return")
        if metrics.pop("evaluated"):  # else eval_return is the previous evaluation's
            metrics["eval_return"] = eval_return
        bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
        if bad:
            self.error = f"training diverged: {', '.join(bad)} became NaN/inf at update {update} ({env_steps} steps)"
            self.diverged_at = dict(update=update, env_steps=env_steps)
            raise FloatingPointError(self.error)
        now = time.perf_counter()
        if self.start is None:  # the clock starts at the end of update 1, so the first line has a rate too
            self.start, self.last_time, self.last_steps = now, now, env_steps
        last = env_steps + self.steps_per_update > self.args.total_timesteps
        if update % self.args.log_every and "eval_return" not in metrics and not last:
            return
        elapsed = now - self.start
        for i in range(self.args.num_seeds):
            row = dict(seed=self.args.seed + i, update=update, env_steps=env_steps, elapsed_s=round(elapsed, 2),
                       eval_return=None)  # fmt: skip
            self.rows.append({**row, **{k: float(v[i]) for k, v in metrics.items()}})
        with open(self.csv_path, "w", newline="") as f:  # rewritten whole: cheap, and never half a row
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        mean = {k: float(v.mean()) for k, v in metrics.items()}
        sps = (env_steps - self.last_steps) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_steps = now, env_steps
        evaluation = f" | eval {mean['eval_return']:8.1f}" if "eval_return" in mean else ""
        print(f"update {update:>5} | steps {env_steps:>11,} | return {mean['train_return']:9.1f} | "
              f"loss {mean['loss']:8.4f} | kl {mean['approx_kl']:.4f} | {sps:8,.0f} steps/s | {elapsed:7.1f} s"
              f"{evaluation}", flush=True)  # fmt: skip
        if self.wandb_run is not None:
            self.wandb_run.log(mean, step=env_steps)


class CellLogger(Logger):
    """ppo.py's Logger (live lines, metrics.csv, NaN guard) that also keeps every update's training return."""

    def __init__(self, args, csv_path):
        super().__init__(args, os.path.dirname(csv_path))
        self.csv_path, self.curve = csv_path, []

    def __call__(self, metrics):
        self.curve.append((int(metrics["env_steps"]), np.asarray(metrics["train_return"]).tolist()))
        super().__call__(metrics)


def resolve_cells(args):
    """Every check, before anything is compiled: returns {(env, algo): the cell's resolved Args}."""
    envs_, algos = list(dict.fromkeys(args.envs)), list(dict.fromkeys(args.algos))  # in order, once each
    if not envs_ or not algos:
        raise SystemExit("error: --envs and --algos need at least one name each")
    unknown = [a for a in algos if a not in ALGOS]
    if unknown:
        raise SystemExit(f"error: unknown algo {unknown[0]!r}; choose among: {', '.join(ALGOS)}")
    if "lpo" in algos and args.drift is None:
        raise SystemExit("error: --algos lpo needs --drift (the drift.msgpack written by lpo_meta.py)")
    if args.drift is not None:
        check_drift_file(args.drift)
    per_env = {env: resolve_args(dataclasses.replace(args, env=env)) for env in envs_}
    return {(env, algo): dataclasses.replace(per_env[env], algo=algo) for env in envs_ for algo in algos}


NOT_IN_CELL = ("envs", "algos", "drift", "results_dir", "num_bootstrap", "log_every")  # no effect on a cell's result
UNUSED_BY = {"ppo": ("dpo_alpha", "dpo_beta"), "dpo": ("clip_eps",), "lpo": ("clip_eps", "dpo_alpha", "dpo_beta")}


def cell_config(args):
    """What determines a cell's result; its hash is the fingerprint that decides whether a saved cell is reused."""
    config = {k: v for k, v in dataclasses.asdict(args).items() if k not in NOT_IN_CELL + UNUSED_BY[args.algo]}
    if args.algo == "lpo":
        with open(args.drift, "rb") as f:
            config["drift_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return config


def fingerprint(config):
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def cell_path(args, env, algo):
    return os.path.join(args.results_dir, "cells", f"{env}__{algo}.json")


def read_cell(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_cell(args, path):
    """Trains one cell (all seeds vmapped, one compile) and saves its result atomically to path."""
    logger = CellLogger(args, path.removesuffix(".json") + ".metrics.csv")
    train = jax.jit(make_train(args, log_fn=logger), compiler_options=compiler_options())
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(args.seed, args.seed + args.num_seeds))
    start = time.perf_counter()
    compiled = train.lower(keys).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        _, eval_returns = jax.block_until_ready(compiled(keys))
    except Exception:
        if logger.error:
            raise SystemExit(f"error: {args.env}/{args.algo}: {logger.error}") from None
        raise
    run_s = time.perf_counter() - start
    eval_per_seed = np.asarray(eval_returns).mean(axis=1)
    if not np.all(np.isfinite(eval_per_seed)):
        raise SystemExit(f"error: {args.env}/{args.algo}: final evaluation returned NaN/inf: {eval_per_seed.tolist()}")
    num_updates = args.total_timesteps // (args.num_envs * args.num_steps * args.action_repeat)
    curve = sorted(logger.curve)
    config = cell_config(args)
    result = dict(
        env=args.env,
        algo=args.algo,
        fingerprint=fingerprint(config),
        seeds=list(range(args.seed, args.seed + args.num_seeds)),
        eval_return_per_seed=eval_per_seed.tolist(),
        eval_return_mean=float(eval_per_seed.mean()),
        env_steps=num_updates * args.num_envs * args.num_steps * args.action_repeat,
        compile_s=round(compile_s, 2),
        run_s=round(run_s, 2),
        curve=dict(env_steps=[s for s, _ in curve], train_return=[r for _, r in curve]),
        config=config,
    )
    atomic_write(path, json.dumps(result, indent=1).encode())
    return result


# ---------------------------------------------------------------------------------------------------
# Statistics, table and figures.


def bootstrap_ci(values, num_resamples=10_000, confidence=0.95, seed=0):
    """Percentile bootstrap interval of the mean: the seeds resampled with replacement num_resamples times,
    from a fixed numpy Generator seed (the same data always gives the same interval)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(num_resamples, len(values)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def write_tables(args, envs_, algos, results, drift_config):
    """results.csv and results.json (one row per env, algo and seed), results.md (one entry per cell)."""
    rows = [
        dict(env=env, algo=algo, seed=seed, eval_return=value)
        for env in envs_
        for algo in algos
        for seed, value in zip(results[env, algo]["seeds"], results[env, algo]["eval_return_per_seed"], strict=True)
    ]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(os.path.join(args.results_dir, "results.csv"), text.getvalue().encode())
    atomic_write(os.path.join(args.results_dir, "results.json"), json.dumps(rows, indent=1).encode())

    means = {key: float(np.mean(r["eval_return_per_seed"])) for key, r in results.items()}
    lines = ["# Final evaluation return: " + " vs ".join(a.upper() for a in algos), "",
             "| env | env steps | " + " | ".join(algos) + " |", "|:---|---:|" + "---:|" * len(algos)]  # fmt: skip
    for env in envs_:
        best = max(means[env, algo] for algo in algos)
        entries = []
        for algo in algos:
            low, high = bootstrap_ci(results[env, algo]["eval_return_per_seed"], args.num_bootstrap)
            mean = f"{means[env, algo]:.1f}"
            entry = (f"**{mean}**" if means[env, algo] == best else mean) + f" [{low:.1f}, {high:.1f}]"
            if "ppo" in algos and algo != "ppo" and means[env, "ppo"] > 0:
                entry += f" ×{means[env, algo] / means[env, 'ppo']:.2f}"
            entries.append(entry)
        lines.append(f"| {env} | {results[env, algos[0]]['env_steps']:,} | " + " | ".join(entries) + " |")
    seeds = results[envs_[0], algos[0]]["seeds"]
    lines += [
        "",
        f"Each entry: the mean over {len(seeds)} seed(s) ({seeds[0]}–{seeds[-1]}) of the final evaluation return "
        f"(deterministic policy, mean of {args.num_eval_envs} episodes of up to {args.episode_length} steps), "
        f"[its 95% percentile-bootstrap interval over seeds, {args.num_bootstrap:,} resamples], and ×: the ratio "
        "of the mean to PPO's (shown when PPO's mean is positive). Bold: the best mean of the row. In a row every "
        "algorithm ran with the same settings, budget and seeds; only the drift differs.",
    ]
    if drift_config is not None:
        lines += ["", f"LPO drift: `{args.drift}`, meta-trained on {drift_config['env']} "
                  f"(ppo_init={drift_config['ppo_init']}, temporal={drift_config['temporal']}); "
                  "on every other env it is applied without having seen it (transfer)."]  # fmt: skip
    lines += ["", "Settings per env (the same for every algorithm):", ""]
    for env in envs_:
        c = results[env, algos[0]]["config"]
        lines.append(f"- {env}: {c['num_envs']} envs × {c['num_steps']} steps per update, "
                     f"{results[env, algos[0]]['env_steps'] // (c['num_envs'] * c['num_steps'] * c['action_repeat'])} "
                     f"updates of {c['update_epochs']} epochs × {c['num_minibatches']} minibatches, hidden "
                     f"{tuple(c['hidden_sizes'])}, lr {c['learning_rate']}, γ {c['gamma']}, reward scaling "
                     f"{c['reward_scaling']}, {c['backend']} backend")  # fmt: skip
    lines += ["", "Wall time per cell, compile + training and evaluation (s):", "",
              "| env | " + " | ".join(algos) + " |", "|:---|" + "---:|" * len(algos)]  # fmt: skip
    for env in envs_:
        times = [f"{results[env, a]['compile_s']:.0f} + {results[env, a]['run_s']:.0f}" for a in algos]
        lines.append(f"| {env} | " + " | ".join(times) + " |")
    atomic_write(os.path.join(args.results_dir, "results.md"), ("\n".join(lines) + "\n").encode())


def plot_curves(path, envs_, algos, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(len(envs_), 3)
    nrows = math.ceil(len(envs_) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, env in zip(axes.flat, envs_, strict=False):
        for algo in algos:
            curve = results[env, algo]["curve"]
            returns = np.array(curve["train_return"])  # updates × seeds
            line = ax.plot(curve["env_steps"], returns.mean(1), label=algo.upper())[0]
            ax.fill_between(curve["env_steps"], returns.min(1), returns.max(1), color=line.get_color(), alpha=0.2)
        ax.set(title=env, xlabel="environment steps", ylabel="training episode return")
        ax.legend(loc="best", fontsize="small")
    for ax in axes.flat[len(envs_) :]:
        ax.axis("off")
    fig.suptitle("mean over seeds (line) and min–max (band)", fontsize="small")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def plot_drifts(path, args, lpo=None):
    """Heat maps of ∂(r·Â − D)/∂r over (r, Â): where the objective still pushes the ratio up (red) or down (blue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios, advantages = np.linspace(0.1, 2.0, 191), np.linspace(-3.0, 3.0, 121)
    r, a = (jnp.asarray(x, jnp.float32) for x in np.meshgrid(ratios, advantages))
    panels = [(f"PPO (ε = {args.clip_eps})", lambda r, a: ppo_drift(r, a, args.clip_eps)),
              (f"DPO (α = {args.dpo_alpha}, β = {args.dpo_beta})",
               lambda r, a: dpo_drift(r, a, args.dpo_alpha, args.dpo_beta))]  # fmt: skip
    if lpo is not None:
        params, config = lpo
        for progress in (0.0, 1.0) if config["temporal"] else (0.0,):
            title = f"LPO ({config['env']})" + (f", n/N = {progress:g}" if config["temporal"] else "")
            panels.append((title, lambda r, a, p=progress: lpo_drift(
                params, r, a, p, config["ppo_init"], config["clip_eps"], config["temporal"])))  # fmt: skip
    grads = [np.asarray(jax.grad(lambda r, d=drift: jnp.sum(r * a - d(r, a)))(r)) for _, drift in panels]
    vmax = float(advantages.max())  # the slope without drift is Â; steeper rollback saturates the colours
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels) + 1, 3.8), squeeze=False, layout="constrained")
    for ax, (title, _), grad in zip(axes[0], panels, grads, strict=True):
        image = ax.imshow(grad, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                          extent=(ratios[0], ratios[-1], advantages[0], advantages[-1]))  # fmt: skip
        ax.axvline(1.0, color="k", lw=0.5, ls="--")
        ax.set(title=title, xlabel="ratio r", ylabel="advantage Â")
    fig.colorbar(image, ax=list(axes[0]), label="∂(r·Â − D)/∂r", extend="both")
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def main(argv=None):
    args = tyro.cli(Args, description=__doc__, args=argv)
    cells = resolve_cells(args)
    envs_, algos = list(dict.fromkeys(env for env, _ in cells)), list(dict.fromkeys(algo for _, algo in cells))
    lpo = check_drift_file(args.drift) if args.drift is not None else None
    os.makedirs(os.path.join(args.results_dir, "cells"), exist_ok=True)
    logging.getLogger("jax._src.debugging").setLevel(logging.CRITICAL)  # the NaN guard reports itself

    results = {}
    for number, ((env, algo), cell) in enumerate(cells.items(), 1):
        path, name = cell_path(args, env, algo), f"[{number}/{len(cells)}] {env}/{algo}"
        saved = read_cell(path)
        if saved is not None and saved["fingerprint"] == fingerprint(cell_config(cell)):
            print(f"{name}: already done, eval return {saved['eval_return_mean']:.1f} ({path})", flush=True)
            results[env, algo] = saved
            continue
        if saved is not None:
            print(f"{name}: the saved cell was run with other settings; recomputing it", flush=True)
        print(f"{name}: {cell.num_seeds} seed(s), {cell.total_timesteps:,} steps, {cell.num_envs} envs × "
              f"{cell.num_steps} steps per update", flush=True)  # fmt: skip
        result = results[env, algo] = run_cell(cell, path)
        print(f"{name}: eval return {result['eval_return_mean']:.1f} | compile {result['compile_s']:.1f} s, "
              f"run {result['run_s']:.1f} s", flush=True)  # fmt: skip

    write_tables(args, envs_, algos, results, lpo[1] if lpo else None)
    plot_curves(os.path.join(args.results_dir, "curves.png"), envs_, algos, results)
    plot_drifts(os.path.join(args.results_dir, "drifts.png"), args, lpo)
    print(open(os.path.join(args.results_dir, "results.md")).read(), flush=True)
    print(f"results in {args.results_dir}: results.md, results.csv, results.json, curves.png, drifts.png")


if __name__ == "__main__":
    main()

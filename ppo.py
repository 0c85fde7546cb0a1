"""PPO on Brax in one file: the baseline of "Discovered Policy Optimisation" (Lu et al., NeurIPS 2022).

In Mirror Learning terms a policy update maximises mean(r·Â − D(r, Â)) with r = π_θ(a|s) / π_old(a|s).
PPO's clipped objective is one choice of drift D (`ppo_drift` below); dpo.py is this file with DPO's
drift instead, so `diff ppo.py dpo.py` shows exactly what DPO changes.

    python ppo.py --env ant                  # ant's preset for this machine: cpu on a CPU, paper on a GPU
    python ppo.py --env ant --preset paper   # the authors' Brax settings, sized for an accelerator
    python ppo.py --env hopper --num-seeds 4 # four seeds, vmapped in one compile
"""

import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import sys
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import optax
import tyro
from flax import linen as nn
from flax import serialization

with contextlib.redirect_stdout(io.StringIO()):  # only mujoco prints here: that its optional GPU physics is absent
    from brax import envs
    from brax.envs.wrappers.training import AutoResetWrapper, EpisodeWrapper, VmapWrapper


def mujoco_warning(message):
    """MuJoCo's warnings, printed by its C code, as Python warnings; but for a deprecated attribute in Brax's own
    halfcheetah model, which is not the user's to fix."""
    if "settotalmass" not in message:
        warnings.warn(f"MuJoCo: {message}", stacklevel=1)


mujoco.set_mju_user_warning(mujoco_warning)

ALGO = "ppo"


@dataclasses.dataclass
class Args:
    env: str = "ant"
    """Brax environment; its preset (PRESETS below) fills every field left at None."""
    preset: str = "auto"
    """Preset tier: cpu (tuned on 2 CPU cores), paper (the authors' Brax settings) or auto (cpu on a CPU, else paper)"""
    backend: str | None = None
    """Physics backend: spring, positional, generalized or mjx (preset: per env and tier, see PRESETS)."""
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
    anneal_lr: tyro.conf.DisallowNone[bool | None] = None
    """Decay the learning rate linearly to zero over training (preset: on in the pendulums' cpu tiers, else off)."""
    gamma: float | None = None
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE λ."""
    clip_eps: float | None = None
    """PPO's clipping range ε: the drift is zero for r in [1 − ε, 1 + ε] (preset: 0.2, but ppo.py's 0.3 for ant,
    hopper and halfcheetah on the cpu tier)."""
    ent_coef: float | None = None
    """Entropy bonus coefficient (preset: 0, but ppo.py's for inverted_pendulum on the cpu tier)."""
    vf_coef: float = 0.5
    """Value loss coefficient (the value loss is 0.5·MSE)."""
    max_grad_norm: float | None = None
    """Gradient norm clip (0: off, as in the authors' Brax settings)."""
    clip_per_network: bool = True
    """Clip the policy's and the value network's gradient norms apart (off: one norm over both, as PureJaxRL)."""
    reward_scaling: float | None = None
    """Rewards are multiplied by this for learning (reported returns are unscaled)."""
    normalize_rewards: tyro.conf.DisallowNone[bool | None] = None
    """Divide rewards by the running std of discounted returns, clipped to ±10 (preset: as anneal_lr)."""
    vf_clip: float | None = None
    """Clip each value update to V_old ± vf_clip, PPO2-style: the larger of both squared errors (None: off)."""
    normalize_obs: bool = True
    """Normalise observations with running statistics, clipped to [-5, 5]."""
    episode_length: int = 1000
    """Time limit of an episode in environment steps (a truncation, not a terminal state)."""
    action_repeat: int | None = None
    """Environment steps per action."""
    hidden_sizes: tuple[int, ...] | None = None
    """Hidden layer widths of the policy and of the value network (tanh)."""
    init_std: float | None = None
    """Initial std of the policy's Gaussian (learnt, state-independent)."""
    tanh_squash: bool = False
    """Squash Gaussian samples into [-1, 1] by tanh instead of clipping (ratios stay those of the samples)."""
    num_eval_envs: int = 128
    """Environments in each deterministic evaluation (one full episode each, the mean action)."""
    num_evals: int = 1
    """Evaluations, evenly spaced over training, the last at the end (at most one per update)."""
    log_every: int = 10
    """Print and record metrics every this many updates."""
    track: bool = False
    """Log metrics to Weights & Biases."""
    wandb_project: str = "discovered-policy-optimisation"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user)."""
    out_dir: str | None = None
    """Output folder (default: runs/{env}__{algo}__{seed}__{timestamp})."""
    save_model: bool = False
    """Save the trained policy, value network and normaliser to params.msgpack."""
    render: bool = False
    """Write replay.html: one evaluation episode in Brax's HTML viewer."""


# ============================================================================================================
# THE ALGORITHM: networks, drift, observation normalisation, env, GAE, evaluation and make_train.
# Everything that runs inside the compiled training program is between these two banners.
# ============================================================================================================


# ---------------------------------------------------------------------------------------------------
# Networks: separate policy and value MLPs; a Gaussian policy with a state-independent log-std whose samples
# are clipped (or, with --tanh-squash, squashed by tanh) into the action range [-1, 1]. Ratios and
# log-probabilities are those of the Gaussian sample, before the clip or squash.


class MLP(nn.Module):
    hidden_sizes: tuple[int, ...]
    out_size: int
    out_scale: float  # init gain of the last layer: small for the policy mean

    @nn.compact
    def __call__(self, x):
        for size in self.hidden_sizes:
            x = nn.tanh(nn.Dense(size, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(x))
        return nn.Dense(self.out_size, kernel_init=nn.initializers.orthogonal(self.out_scale))(x)


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
    return jnp.sum(jax.scipy.stats.norm.logpdf(x, mean, jnp.exp(log_std)), axis=-1)


# ---------------------------------------------------------------------------------------------------
# The drift: the one piece that makes this PPO. D ≥ 0, D(1, A) = 0 and ∂D/∂r(1, A) = 0.


def ppo_drift(ratio, advantages, clip_eps=0.2):
    """D_PPO(r, A) = ReLU((r − clip(r, 1 − ε, 1 + ε))·A), so that r·A − D = min(r·A, clip(r)·A)."""
    return jax.nn.relu((ratio - jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)) * advantages)


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
# Training: rollout → GAE → epochs of minibatch updates, all seeds vmapped, all updates in one scan.


def shuffled_indices(key, n):
    """A random permutation of range(n), for the minibatches. XLA's CPU sort is much faster on one uint32 array
    than on the key-value pairs jax.random.permutation sorts (bench/README.md), so each index rides in the low
    bits of a random key. Indices whose random bits tie keep their order (runs of ~n / 2^(32 -
    index_bits), ~10 at n = 163,840): a sample's minibatch stays uniformly random, tied ones just tend to
    share it. Past 2^20 samples too few random bits are left, so the exact shuffle is used."""
    index_bits = max(1, (n - 1).bit_length())
    if index_bits > 20:
        return jax.random.permutation(key, n)
    keys = jax.random.bits(key, (n,)) >> index_bits << index_bits | jnp.arange(n, dtype=jnp.uint32)
    return (jnp.sort(keys) & (2**index_bits - 1)).astype(jnp.int32)


def gradient_clip(args):
    """Clips the gradient's norm to max_grad_norm (0: no clip), the policy's and the value network's apart with
    clip_per_network: else the value loss's large gradient would shrink the policy's step as well."""
    if args.max_grad_norm <= 0:
        return optax.identity()
    clip = optax.clip_by_global_norm(args.max_grad_norm)
    if not args.clip_per_network:
        return clip
    return optax.multi_transform(
        {"policy": clip, "value": clip}, dict(actor="policy", log_std="policy", critic="value")
    )


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

    `keys` holds one PRNG key per seed; every seed is vmapped. `log_fn(metrics)` is called from inside
    the jitted loop after every update with a dict of per-seed arrays (None: no logging)."""
    env = make_env(args)
    # The observation size from the shapes alone: brax's env.observation_size runs a whole reset op by op.
    obs_size = jax.eval_shape(env.unwrapped.reset, jax.random.PRNGKey(0)).obs.shape[-1]
    init_params, policy, value = make_networks(args, obs_size, env.action_size)
    evaluate = make_evaluate(args, policy)
    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_updates = args.total_timesteps // (batch_size * args.action_repeat)
    num_grad_steps = num_updates * args.update_epochs * args.num_minibatches
    lr = optax.linear_schedule(args.learning_rate, 0.0, num_grad_steps) if args.anneal_lr else args.learning_rate
    optimizer = optax.chain(gradient_clip(args), optax.adam(lr, eps=1e-5))

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
        if args.normalize_rewards:  # clipped: envs in lockstep have a variance of ~0 (pendulum: every step pays 1)
            return_stats = update_obs_stats(return_stats, discounted[:, None])
            reward = jnp.clip(reward * jax.lax.rsqrt(return_stats.var[0] + 1e-8), -10.0, 10.0)
        transition = Transition(
            obs=obs,
            action=action,
            log_prob=gaussian_log_prob(action, mean, log_std),
            reward=reward,
            termination=done * (1.0 - env_state.info["truncation"]),
            done=done,
        )
        # done is Brax's info["episode_done"]: the step ended an episode, by termination or time-out
        last_return = jnp.where(done > 0, env_state.info["episode_metrics"]["sum_reward"], runner.last_return)
        runner = runner._replace(env_state=env_state, return_stats=return_stats, discounted=discounted * (1.0 - done),
                                 last_return=last_return, finished=runner.finished | (done > 0), key=key)  # fmt: skip
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
            drift = ppo_drift(ratio, advantages, args.clip_eps)
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
        runners = jax.lax.map(init_runner, keys)  # not vmapped: a batched QR (orthogonal init) hangs XLA:CPU
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


# ============================================================================================================
# END OF THE ALGORITHM. Below: presets and argument checks, saving and loading, logging, main.
# ============================================================================================================


# Per-env settings for the Args left at None, in two tiers (docs/implementation.md, items 2, 7, 18 and 24): `paper`, the
# authors' Brax settings sized for an accelerator, and `cpu`, on top of them, measured on 2 CPU cores (bench/README.md).
PRESET_FIELDS = ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "learning_rate",
                 "gamma", "reward_scaling", "action_repeat", "backend")  # fmt: skip
PAPER_COMMON = dict(hidden_sizes=(256, 256), init_std=1.0, max_grad_norm=0.0, ent_coef=0.0, clip_eps=0.2,
                    anneal_lr=False, normalize_rewards=False)  # fmt: skip
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
# The cpu tier's base: PureJaxRL's Brax settings (2048 envs × 10 steps, 32 minibatches × 4 epochs, γ 0.99, gradient
# clip 0.5, reward scale 1), the best tried on ant; each env's steps: how far it got in bench/sweep.py's budget;
# positional physics where it learnt more than spring in that time (hopper, walker2d); on walker2d a smaller batch:
# 2.5× the updates from the same steps lifted PPO and left DPO where it was.
PUREJAXRL = dict(num_envs=2048, num_steps=10, num_minibatches=32, update_epochs=4, gamma=0.99, max_grad_norm=0.5,
                 reward_scaling=1.0)
# The pendulums' base: small batches, many updates, a small network, a low initial std, rewards normalised and the
# learning rate annealed to zero (with PureJaxRL's base the pendulum stayed up on some seeds only: bench/README.md).
PENDULUM = dict(num_envs=128, num_steps=32, num_minibatches=4, learning_rate=1e-3, gamma=0.995, hidden_sizes=(64, 64),
                init_std=0.3, anneal_lr=True, normalize_rewards=True)
CPU_PRESETS = {  # on top of the env's paper settings; why each, and what it reached: bench/README.md
    "ant": dict(PUREJAXRL, total_timesteps=4_096_000),
    "hopper": dict(PUREJAXRL, total_timesteps=3_276_800, backend="positional"),
    "walker2d": dict(PUREJAXRL, num_envs=512, num_steps=16, num_minibatches=8, total_timesteps=2_252_800,
                     backend="positional"),
    "halfcheetah": dict(PUREJAXRL, total_timesteps=2_007_040),
    "inverted_double_pendulum": dict(PENDULUM, total_timesteps=1_000_000, max_grad_norm=0.5),
    "reacher": dict(PUREJAXRL, total_timesteps=11_960_320),
    "pusher": dict(PUREJAXRL, total_timesteps=512_000),
    "humanoid": dict(PUREJAXRL, total_timesteps=4_505_600),
    "inverted_pendulum": dict(PENDULUM, total_timesteps=4_000_000),
}
# fmt: on
# What one algorithm needs for itself on top of its cpu tier (why: bench/README.md, the inverted_pendulum table).
# On inverted_pendulum PPO's std collapses and a seed can settle on a policy that drifts into the end of the rail:
# an entropy bonus keeps it exploring, and it is done in 3M steps (longer, a seed slipped again). DPO keeps its std
# without a bonus and needs the 4M. On inverted_double_pendulum PPO's std shrinks fast: from 1.0 it reached the top on
# more seeds. PPO's clipping range: Brax's 0.3 made it learn sooner and end higher on ant, hopper, halfcheetah.
# eval_transfer.py asks for such fields on its command line, but for the drift's own (clip_eps).
CPU_PRESETS_PER_ALGO = {
    ("inverted_pendulum", "ppo"): dict(ent_coef=0.01, total_timesteps=3_000_000),
    ("inverted_double_pendulum", "ppo"): dict(init_std=1.0),
    ("ant", "ppo"): dict(clip_eps=0.3),
    ("hopper", "ppo"): dict(clip_eps=0.3),
    ("halfcheetah", "ppo"): dict(clip_eps=0.3),
}
CHOICES = dict(env=PRESETS, preset=("auto", "cpu", "paper"), backend=("spring", "positional", "generalized", "mjx"))


def preset_for(env, tier):
    """The settings of one env and tier ("cpu" or "paper") for the fields left at None."""
    preset = {**dict(zip(PRESET_FIELDS, PRESETS[env], strict=True)), **PAPER_COMMON}
    if tier == "cpu":
        preset.update(CPU_PRESETS.get(env, {}), **CPU_PRESETS_PER_ALGO.get((env, ALGO), {}))
    return {k: v for k, v in preset.items() if k in Args.__dataclass_fields__}  # dpo.py has no clip_eps


def resolve_args(args: Args) -> Args:
    """Fill the fields left at None from the env's preset tier (the returned args.preset: cpu or paper) and check
    every value before anything is compiled; a bad one is a one-line SystemExit("error: ...")."""

    def check(ok, message):
        if not ok:
            raise SystemExit(f"error: {message}")

    def check_choices(*names):
        for name in names:
            value = getattr(args, name)
            check(value in CHOICES[name], f"unknown {name} {value!r}; choose one of: {', '.join(CHOICES[name])}")

    check_choices("env", "preset")
    no_cpu_preset = f"env {args.env!r} has no cpu preset yet (envs with one: {', '.join(CPU_PRESETS)})"
    check(args.preset != "cpu" or args.env in CPU_PRESETS, f"{no_cpu_preset}; use --preset paper")
    on_cpu = jax.default_backend() == "cpu" and args.env in CPU_PRESETS
    tier = args.preset if args.preset != "auto" else "cpu" if on_cpu else "paper"
    preset = {k: v for k, v in preset_for(args.env, tier).items() if getattr(args, k) is None}
    args = dataclasses.replace(args, preset=tier, **preset)
    check_choices("backend")
    try:
        envs.get_environment(args.env, backend=args.backend)
    except Exception as e:  # brax raises ValueError/KeyError for backends an env lacks
        check(False, f"env {args.env!r} does not support backend {args.backend!r} ({e})")
    positive_floats = ("learning_rate", "reward_scaling", "init_std", "vf_clip", "clip_eps")  # vf_clip None: off
    for name, value in dataclasses.asdict(args).items():  # every count and size, and these floats
        if type(value) is int and name != "seed" or name in positive_floats and value is not None:
            check(value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")
    batch = args.num_envs * args.num_steps
    updates = args.total_timesteps // (batch * args.action_repeat)
    for ok, message in (
        (args.max_grad_norm >= 0, f"--max-grad-norm must be ≥ 0 (0: off), got {args.max_grad_norm}"),
        (0 < args.gamma <= 1 and 0 <= args.gae_lambda <= 1,
         f"--gamma must be in (0, 1] and --gae-lambda in [0, 1], got {args.gamma} and {args.gae_lambda}"),
        (batch % args.num_minibatches == 0, f"num_envs·num_steps = {args.num_envs}·{args.num_steps} = {batch} is "
                                            f"not divisible by --num-minibatches {args.num_minibatches}"),
        (updates > 0, f"--total-timesteps {args.total_timesteps} is less than one update "
                      f"(num_envs·num_steps·action_repeat = {batch * args.action_repeat})"),
        (args.num_evals <= updates, f"--num-evals {args.num_evals} is more than the {updates} updates "
                                    "(at most one evaluation per update)"),
        (all(h > 0 for h in args.hidden_sizes), f"--hidden-sizes must be positive, got {args.hidden_sizes}"),
    ):  # fmt: skip
        check(ok, message)
    return args


def compiler_options():
    """XLA options for jax.jit: on CPUs, no YNNPACK fusions, which jaxlib 0.10 uses by default and which run
    Brax's physics and training markedly slower than XLA's own CPU kernels (bench/README.md). Other backends: none."""
    return {"xla_cpu_experimental_ynn_fusion_type": ""} if jax.default_backend() == "cpu" else {}


# ---------------------------------------------------------------------------------------------------
# Files: every one written atomically; a trained policy saved and loaded; a replay.


def atomic_write(path, data: bytes):
    with open(f"{path}.tmp{os.getpid()}", "wb") as f:
        f.write(data)
    os.replace(f.name, path)


def save_policy(path, args, params, obs_stats):
    """params and obs_stats carry a leading seed axis; all seeds are saved."""
    blob = {"config": json.dumps(dataclasses.asdict(args)), "params": params, "obs_stats": obs_stats._asdict()}
    atomic_write(path, serialization.msgpack_serialize(jax.device_get(blob)))


def make_act(args, params, obs_stats):
    """act(obs) → the deterministic action of one seed's policy: its mean, brought into [-1, 1]."""
    _, policy, _ = make_networks(args, obs_stats.mean.shape[-1], params["log_std"].shape[-1])
    mean = lambda obs: policy(params, normalize_obs(obs_stats, obs, args.normalize_obs))[0]
    return lambda obs: env_action(mean(obs), args.tanh_squash)


def load_policy(path, seed_index=0):
    """Returns (act, args): act(obs) → deterministic action of the saved policy of the given seed."""
    with open(path, "rb") as f:
        blob = serialization.msgpack_restore(f.read())
    config = json.loads(blob["config"])
    args = Args(**{**config, "hidden_sizes": tuple(config["hidden_sizes"])})
    pick = lambda x: jnp.asarray(x[seed_index])
    params, obs_stats = jax.tree.map(pick, (blob["params"], ObsStats(**blob["obs_stats"])))
    return jax.jit(make_act(args, params, obs_stats), compiler_options=compiler_options()), args


def write_replay(path, args, params, obs_stats, key):
    """One deterministic episode of the first seed's policy, as Brax's HTML viewer page: every physics step
    of episode_length, each action held for action_repeat steps as in training."""
    from brax.io import html

    env = envs.get_environment(args.env, backend=args.backend)
    act = make_act(args, *jax.tree.map(lambda x: x[0], (params, obs_stats)))

    def episode(key):
        def decide(state, _):
            action = act(state.obs)
            hold = lambda state, _: (env.step(state, action), state.pipeline_state)
            return jax.lax.scan(hold, state, None, args.action_repeat)

        _, states = jax.lax.scan(decide, env.reset(key), None, -(-args.episode_length // args.action_repeat))
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), states)  # (decisions, repeats) → steps

    states = jax.jit(episode, compiler_options=compiler_options())(key)
    frames = [jax.tree.map(lambda x, i=i: x[i], states) for i in range(args.episode_length)]
    atomic_write(path, html.render(env.sys.tree_replace({"opt.timestep": env.dt}), frames).encode())


# ---------------------------------------------------------------------------------------------------
# Logging: progress lines, metrics.csv, W&B, the NaN guard; the returns plot.


class Logger:
    """Receives per-update metrics from inside the jitted loop (via jax.debug.callback): records every log_every
    updates, evaluation and the last update in metrics.csv, and prints a progress line at those and at least every
    PRINT_EVERY_S seconds (on a terminal: a bar, every second). A NaN/inf metric sets self.error and
    self.diverged_at, and raises."""

    PRINT_EVERY_S = 10.0

    def __init__(self, args, out_dir, wandb_run=None):
        self.args, self.wandb_run, self.csv_path = args, wandb_run, os.path.join(out_dir, "metrics.csv")
        self.rows, self.error, self.diverged_at, self.last_eval = [], None, None, None
        self.num_updates = args.total_timesteps // (args.num_envs * args.num_steps * args.action_repeat)
        self.bar = None  # on a terminal a live progress bar; in logs, CI and batch jobs plain lines
        if sys.stdout.isatty():
            from rich.progress import Progress, TextColumn

            self.bar = Progress(*Progress.get_default_columns(), TextColumn("{task.fields[status]}"))
            total = self.num_updates * args.num_envs * args.num_steps * args.action_repeat
            self.task = self.bar.add_task(f"{ALGO} {args.env}", total=total, status="")
        self.begin()

    def begin(self):
        """Starts the clock of the rates and times to go; main restarts it when training starts, after the compile."""
        self.start = self.last_time = time.perf_counter()
        self.last_steps = 0

    def close(self):
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, metrics):
        metrics = {k: np.asarray(v) for k, v in metrics.items()}
        update, env_steps, eval_return = (metrics.pop(k) for k in ("update", "env_steps", "eval_return"))
        update, env_steps = int(update), int(env_steps)
        if metrics.pop("evaluated"):  # else eval_return is the previous evaluation's
            metrics["eval_return"] = eval_return
        bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
        if bad:
            self.error = f"training diverged: {', '.join(bad)} became NaN/inf at update {update} ({env_steps} steps)"
            self.diverged_at = dict(update=update, env_steps=env_steps)
            raise FloatingPointError(self.error)
        now = time.perf_counter()
        record = update % self.args.log_every == 0 or "eval_return" in metrics or update == self.num_updates
        if not (record or update == 1 or now - self.last_time >= (1.0 if self.bar is not None else self.PRINT_EVERY_S)):
            return
        elapsed = now - self.start
        mean = {k: float(v.mean()) for k, v in metrics.items()}
        if record:
            row = dict(update=update, env_steps=env_steps, elapsed_s=round(elapsed, 2), eval_return=None)
            self.rows += [{"seed": self.args.seed + i, **row, **{k: float(v[i]) for k, v in metrics.items()}}
                          for i in range(self.args.num_seeds)]  # fmt: skip
            text = io.StringIO()  # rewritten whole, atomically: cheap, and never half a row
            writer = csv.DictWriter(text, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
            atomic_write(self.csv_path, text.getvalue().encode())
            if self.wandb_run is not None:
                self.wandb_run.log(mean, step=env_steps)
        sps = (env_steps - self.last_steps) / max(now - self.last_time, 1e-9)
        eta = elapsed * (self.args.total_timesteps - env_steps) / max(env_steps, 1)
        self.last_time, self.last_steps = now, env_steps
        self.last_eval = mean.get("eval_return", self.last_eval)
        evaluation = f" | eval {self.last_eval:8.1f}" if self.last_eval is not None else ""
        # no return to show before an episode has ended (halfcheetah's episodes end only at the time limit)
        train = f"{mean['train_return']:9.1f}" if mean["episodes_finished"] > 0 else "      n/a"
        if self.bar is not None:
            self.bar.start()  # a no-op once started
            status = f"return {train.strip()}{evaluation} | {sps:,.0f} steps/s"
            return self.bar.update(self.task, completed=env_steps, status=status)
        progress = f"update {update:>5}/{self.num_updates} {100 * update / self.num_updates:3.0f}%"
        print(f"{progress} | steps {env_steps:>11,} | return {train} | loss {mean['loss']:8.4f} | "
              f"kl {mean['approx_kl']:.4f} | {sps:8,.0f} steps/s | {elapsed:6.0f} s, {eta:6.0f} s to go{evaluation}",
              flush=True)  # fmt: skip


def plot_returns(path, rows, title):
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global figure to close

    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    at = lambda step: [r for r in rows if r["env_steps"] == step]
    for key, label in (("train_return", "training episodes"), ("eval_return", "evaluation (mean action)")):
        # a training return exists once every seed has ended an episode (halfcheetah's: only at the time limit)
        steps = sorted(s for s in {r["env_steps"] for r in rows} if all(r[key] is not None and (
            key == "eval_return" or r["episodes_finished"] > 0) for r in at(s)))  # fmt: skip
        if not steps:
            continue
        by_step = np.array([[r[key] for r in at(s)] for s in steps])
        ax.plot(steps, by_step.mean(1), "o-" if key == "eval_return" else "-", label=f"{label}, mean over seeds")
        ax.fill_between(steps, by_step.min(1), by_step.max(1), alpha=0.3)
    ax.set(xlabel="environment steps", ylabel="episode return (shaded: min–max over seeds)", title=title)
    ax.legend()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    warnings.filterwarnings("ignore", message="Brax System, piplines and environments are not actively")
    args = resolve_args(tyro.cli(Args, description=__doc__, args=argv))
    run_name = f"{args.env}__{ALGO}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = args.out_dir or os.path.join("runs", run_name)
    out = lambda name: os.path.join(out_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    config = dataclasses.asdict(args)
    atomic_write(out("config.json"), json.dumps(config, indent=2).encode())
    tier = {**dataclasses.asdict(Args()), **preset_for(args.env, args.preset), "env": args.env, "preset": args.preset}
    changed = ", ".join(f"{k}={v}" for k, v in config.items() if v != tier[k] and k != "out_dir")
    print(f"{ALGO} on {args.env}, {args.preset} preset{' with ' + changed if changed else ''} → {out_dir}\n  "
          + ", ".join(f"{k}={config[k]}" for k in preset_for(args.env, args.preset)), flush=True)  # fmt: skip
    wandb_run = None
    if args.track:
        import wandb

        wandb_run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=run_name,
                               config=config, dir=out_dir)  # fmt: skip
    logger = Logger(args, out_dir, wandb_run)
    logging.getLogger("jax._src.debugging").setLevel(logging.CRITICAL)  # the NaN guard reports itself

    train = jax.jit(make_train(args, log_fn=logger), compiler_options=compiler_options())
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(args.seed, args.seed + args.num_seeds))
    start = time.perf_counter()
    compiled = train.lower(keys).compile()
    compile_s = time.perf_counter() - start
    print(f"compiled in {compile_s:.1f} s", flush=True)
    start = time.perf_counter()
    logger.begin()
    summary = dict(env=args.env, algo=ALGO, preset=args.preset, num_seeds=args.num_seeds, diverged=False)
    try:
        runners, eval_returns = jax.block_until_ready(compiled(keys))
        logger.close()
    except Exception:
        logger.close()
        if not logger.error:
            raise
        # keep what was reached: the last evaluation before the NaN, marked diverged
        evals = [r for r in logger.rows if r["eval_return"] is not None]
        per_seed = [r["eval_return"] for r in evals[-args.num_seeds :]]
        summary.update(diverged=True, error=logger.error, diverged_at_update=logger.diverged_at["update"],
                       diverged_at_env_steps=logger.diverged_at["env_steps"],
                       env_steps=evals[-1]["env_steps"] if evals else 0, eval_return_per_seed=per_seed,
                       eval_return_mean=float(np.mean(per_seed)) if evals else None,
                       compile_s=round(compile_s, 2), run_s=round(time.perf_counter() - start, 2))  # fmt: skip
        atomic_write(out("summary.json"), json.dumps(summary, indent=2).encode())
        raise SystemExit(f"error: {logger.error}") from None
    run_s = time.perf_counter() - start
    eval_per_seed = np.asarray(eval_returns).mean(axis=1)
    if not np.all(np.isfinite(eval_per_seed)):
        raise SystemExit(f"error: final evaluation returned NaN/inf: {eval_per_seed.tolist()}")
    last = logger.rows[-args.num_seeds :]  # the logger always records the last update, a row per seed
    env_steps, ended = last[-1]["env_steps"], all(r["episodes_finished"] > 0 for r in last)
    summary.update(env_steps=env_steps, eval_return_mean=float(eval_per_seed.mean()),
                   eval_return_std=float(eval_per_seed.std()), eval_return_per_seed=eval_per_seed.tolist(),
                   train_return_mean=float(np.mean([r["train_return"] for r in last])) if ended else None,
                   compile_s=round(compile_s, 2), run_s=round(run_s, 2),
                   sps=round(env_steps * args.num_seeds / run_s, 1))  # fmt: skip
    atomic_write(out("summary.json"), json.dumps(summary, indent=2).encode())
    plot_returns(out("returns.png"), logger.rows, f"{ALGO} on {args.env}")
    if args.save_model:
        save_policy(out("params.msgpack"), args, runners.params, runners.obs_stats)
    if args.render:
        write_replay(out("replay.html"), args, runners.params, runners.obs_stats, keys[0])
    if wandb_run is not None:
        wandb_run.summary.update(summary)
        wandb_run.finish()
    print(f"{ALGO} {args.env}: eval return {summary['eval_return_mean']:.1f} ± {summary['eval_return_std']:.1f} "
          f"over {args.num_seeds} seed(s) | {env_steps:,} steps | {summary['sps']:,.0f} steps/s | "
          f"compile {compile_s:.1f} s, run {run_s:.1f} s | {out_dir}")  # fmt: skip


if __name__ == "__main__":
    main()

"""LPO on Brax in one file: meta-learn a drift with evolution strategies ("Discovered Policy Optimisation").

In Mirror Learning terms a policy update maximises mean(r·Â − D(r, Â)) with r = π_θ(a|s) / π_old(a|s).
LPO learns the drift D: a small network (`lpo_drift` below) whose parameters OpenAI-ES evolves. One
fitness evaluation is one whole PPO training run with that drift (`make_train`, ppo.py's inner loop); one
generation trains the whole population in one jitted call, vmapped and sharded over every device.

    python lpo_meta.py --env ant --population-size 64           # GPU(s): the paper's meta-training env
    python lpo_meta.py --env inverted_pendulum --total-timesteps 65536 --num-envs 64 --num-steps 32 \\
        --num-minibatches 8 --hidden-sizes 32 32 --num-eval-envs 16 --population-size 16 --generations 40
                                                                # CPU: inverted_pendulum, a small budget
    python lpo_meta.py --resume runs/DIR                         # continue a stopped run, same config
"""

import contextlib
import csv
import dataclasses
import io
import json
import os
import time
import warnings
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import optax
import tyro
from evosax.algorithms import Open_ES
from evosax.core.fitness_shaping import centered_rank_fitness_shaping_fn, standardize_fitness_shaping_fn
from flax import linen as nn
from flax import serialization
from jax.sharding import NamedSharding, PartitionSpec
from matplotlib.figure import Figure

with contextlib.redirect_stdout(io.StringIO()):  # only mujoco prints here: that its optional GPU physics is absent
    from brax import envs
    from brax.envs.wrappers.training import AutoResetWrapper, EpisodeWrapper, VmapWrapper


def mujoco_warning(message):
    """MuJoCo's warnings, printed by its C code, as Python warnings; but for a deprecated attribute in Brax's own
    halfcheetah model, which is not the user's to fix."""
    if "settotalmass" not in message:
        warnings.warn(f"MuJoCo: {message}", stacklevel=1)


mujoco.set_mju_user_warning(mujoco_warning)

ALGO = "lpo"


@dataclasses.dataclass
class Args:
    env: str = "ant"
    """Brax environment the drift is meta-trained on; its preset (PRESETS below) fills every field left at None."""
    preset: str = "auto"
    """Preset tier: cpu (tuned on 2 CPU cores), paper (the authors' Brax settings) or auto (cpu on a CPU, else paper)"""
    backend: str | None = None
    """Physics backend: spring, positional, generalized or mjx (preset: per env and tier, see PRESETS)."""
    seed: int = 0
    """Seed of the meta-training: of the ES noise, the drift's initial hidden layer and every generation's env keys."""
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
    population_size: int = 32
    """Drifts per generation (even: antithetic pairs); each is scored by whole training runs, all vmapped."""
    generations: int = 1024
    """Generations in total (a resumed run continues up to this number)."""
    num_rollouts: int = 1
    """Training runs per member; all members of a generation share their env seeds (common random numbers)."""
    sigma_init: float = 0.04
    """ES noise scale σ at the first generation."""
    sigma_decay: float = 0.999
    """σ is multiplied by this every generation..."""
    sigma_limit: float = 0.01
    """...down to this floor."""
    es_lr: float = 0.01
    """Adam step size on the ES mean (β1 0.99, β2 0.999)."""
    es_lr_decay: float = 0.999
    """The ES step size is multiplied by this every generation..."""
    es_lr_limit: float = 0.001
    """...down to this floor."""
    fitness_shaping: Literal["centered_rank", "z_score"] = "centered_rank"
    """How returns become ES weights: centred ranks in [-0.5, 0.5], or z-scores."""
    ppo_init: bool = True
    """D = ReLU(D_PPO + f − 1e-4), so the ES mean's start (f ≡ 0) is PPO; off: D = ReLU(f − 1e-4)."""
    temporal: bool = False
    """Temporally-aware LPO: the network also sees (n/N)·x, n/N the fraction of training done."""
    init_drift: str | None = None
    """Start the ES mean from this drift.msgpack (from a run with the same --temporal) instead of f ≡ 0."""
    save_every: int = 16
    """Checkpoint and write the outputs every this many generations (and at the end)."""
    resume: str | None = None
    """Continue the run whose checkpoint is in this folder (same config; --generations may grow)."""
    distributed: bool = False
    """Several hosts: call jax.distributed.initialize() and shard the population over all their devices."""
    out_dir: str | None = None
    """Output folder (default: runs/{env}__{algo}__{seed}__{timestamp})."""


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
# The drift, learnt. D ≥ 0, D(1, A) = 0 and ∂D/∂r(1, A) = 0 hold for any parameters: every feature is
# zero at r = 1 and the network has no biases, so f(1, A) = 0, and the −1e-4 inside the ReLU makes D zero
# in a neighbourhood of r = 1 (so flat there) whatever f's slope.


def ppo_drift(ratio, advantages, clip_eps=0.2):
    """D_PPO(r, A) = ReLU((r − clip(r, 1 − ε, 1 + ε))·A), so that r·A − D = min(r·A, clip(r)·A)."""
    return jax.nn.relu((ratio - jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)) * advantages)


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
# The inner loop, ppo.py's: rollout → GAE → epochs of minibatch updates with the drift given to train.


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


def make_train(args, drift_params, log_fn=None):
    """Returns train(keys) → (final runner state per seed, eval returns per seed and env).
    LPO: every seed learns with lpo_drift(drift_params, ...): one ES member's drift, a traced input.

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
    drift_config = (args.ppo_init, args.clip_eps, args.temporal)  # lpo_drift's arguments after progress

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
            drift = lpo_drift(drift_params, ratio, advantages, update / num_updates, *drift_config)
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


def check_lpo_args(args: Args) -> Args:
    """LPO's own checks, after resolve_args and before anything is compiled."""
    size, devices = args.population_size, jax.device_count()
    schedules = dict(sigma=(args.sigma_init, args.sigma_decay, args.sigma_limit),
                     es_lr=(args.es_lr, args.es_lr_decay, args.es_lr_limit))  # fmt: skip
    other_dir = args.resume and args.out_dir and os.path.abspath(args.out_dir) != os.path.abspath(args.resume)
    for ok, message in [
        (size % 2 == 0, f"--population-size must be even (antithetic pairs), got {size}"),
        (size % devices == 0, f"--population-size {size} must be a multiple of the {devices} devices"),
        *((0 < limit <= init and 0 < decay <= 1, f"--{name.replace('_', '-')} schedule: need 0 < limit ≤ initial "
           f"value and 0 < decay ≤ 1, got {init}, decay {decay}, limit {limit}")
          for name, (init, decay, limit) in schedules.items()),
        (not other_dir, "--resume continues in its own folder: leave --out-dir unset"),
    ]:  # fmt: skip
        if not ok:
            raise SystemExit(f"error: {message}")
    return args


def compiler_options():
    """XLA options for jax.jit: on CPUs, no YNNPACK fusions, which jaxlib 0.10 uses by default and which run
    Brax's physics and training markedly slower than XLA's own CPU kernels (bench/README.md). Other backends: none."""
    return {"xla_cpu_experimental_ynn_fusion_type": ""} if jax.default_backend() == "cpu" else {}


# ---------------------------------------------------------------------------------------------------
# The outer loop: OpenAI-ES on the drift network's parameters. evosax minimises, so it is told −return.


def make_strategy(args):
    """Open_ES with antithetic pairs and Adam on the mean; σ and step size decay exponentially to a floor."""
    shaping = dict(centered_rank=centered_rank_fitness_shaping_fn, z_score=standardize_fitness_shaping_fn)
    shaping = shaping[args.fitness_shaping]

    def shape(population, fitness, state, params):  # a diverged run (NaN) counts as the worst member
        return shaping(population, jnp.where(jnp.isnan(fitness), jnp.nanmax(fitness), fitness), state, params)

    sigma = optax.exponential_decay(args.sigma_init, 1, args.sigma_decay, end_value=args.sigma_limit)
    lr = optax.exponential_decay(args.es_lr, 1, args.es_lr_decay, end_value=args.es_lr_limit)
    optimizer = optax.adam(lr, b1=0.99, b2=0.999)  # the authors' Adam
    solution = init_drift_params(jax.random.PRNGKey(0), args.temporal)  # only its shapes matter here
    strategy = Open_ES(args.population_size, solution, use_antithetic_sampling=True, optimizer=optimizer,
                       std_schedule=sigma, fitness_shaping_fn=shape)  # fmt: skip
    return strategy, lr


def make_generation(args, strategy, mesh):
    """generation(es_state, key) → (es_state, key, return per member, σ used): ask, train every member
    (num_rollouts runs each, on env keys the whole generation shares), tell. One jitted call."""

    def member_return(drift_params, env_keys):  # one whole training run per env key, with this member's drift
        runners, eval_returns = make_train(args, drift_params, log_fn=None)(env_keys)  # no metric stacks
        # a diverged run scores NaN whatever the env says: inverted_pendulum never ends an episode on NaN actions
        finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(runners.params)]))
        return jnp.where(finite, eval_returns.mean(), jnp.nan)

    # check_vma=False: with jax 0.10.2's default type checks on, sharded members trained to wrong returns
    # (tests/test_lpo_meta.py compares 2 devices with 1); the members never communicate anyway
    member_returns = jax.shard_map(jax.vmap(member_return, in_axes=(0, None)), mesh=mesh, check_vma=False,
                                   in_specs=(PartitionSpec("population"), PartitionSpec()),
                                   out_specs=PartitionSpec("population"))  # fmt: skip
    es_params, replicated = strategy.default_params, NamedSharding(mesh, PartitionSpec())

    def generation(es_state, key):
        key, ask_key, tell_key, env_key = jax.random.split(key, 4)
        population, es_state = strategy.ask(ask_key, es_state, es_params)
        # ask and tell run whole on every device, so their sums add up in the same order on any number of them
        population = jax.lax.with_sharding_constraint(population, replicated)
        returns = member_returns(population, jax.random.split(env_key, args.num_rollouts))
        returns = jnp.where(jnp.isfinite(returns), returns, jnp.nan)  # ±inf is a diverged run too
        returns = jax.lax.with_sharding_constraint(returns, replicated)
        new_state, _ = strategy.tell(tell_key, population, -returns, es_state, es_params)
        return new_state, key, returns, es_state.std

    return jax.jit(generation, in_shardings=replicated, out_shardings=replicated, compiler_options=compiler_options())


# ---------------------------------------------------------------------------------------------------
# Files: a checkpoint holds all a run needs to continue bit-exactly, drift.msgpack all a user needs.


def atomic_write(path, data: bytes):
    with open(f"{path}.tmp{os.getpid()}", "wb") as f:
        f.write(data)
    os.replace(f.name, path)


RESUMABLE = ("generations", "save_every", "resume", "out_dir", "distributed", "init_drift")  # may change on resume


def parse_args(argv=None):
    """(args, the checkpoint of --resume DIR or None). With --resume the saved run's config gives every flag's
    default, so that `--resume DIR` alone continues it; flags given must still agree with it, except RESUMABLE ones."""
    args = tyro.cli(Args, args=argv, description=__doc__)
    if not args.resume:
        return args, None
    path = os.path.join(args.resume, "checkpoint.msgpack")
    try:
        with open(path, "rb") as f:
            checkpoint = serialization.msgpack_restore(f.read())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --resume: cannot read {path} ({e})") from None
    fields = {f.name for f in dataclasses.fields(Args)}
    saved = {k: v for k, v in json.loads(checkpoint["config"]).items() if k in fields}
    saved.update(hidden_sizes=tuple(saved["hidden_sizes"]), resume=args.resume, out_dir=None)
    return tyro.cli(Args, args=argv, description=__doc__, default=Args(**saved)), checkpoint


def load_checkpoint(args, checkpoint, es_state):
    """(es_state, key, generation, rows) of a checkpoint, es_state restored into the given template; a one-line
    SystemExit if its run had another config or is past --generations."""
    saved, now = json.loads(checkpoint["config"]), json.loads(json.dumps(dataclasses.asdict(args)))
    changes = [f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {v!r}"
               for k, v in now.items() if k not in RESUMABLE and saved.get(k) != v]  # fmt: skip
    if changes:
        raise SystemExit(f"error: --resume {args.resume} was run with another config: {'; '.join(changes)}")
    if checkpoint["generation"] > args.generations:
        raise SystemExit(f"error: --resume: the checkpoint is at generation {checkpoint['generation']}, "
                         f"past --generations {args.generations}")  # fmt: skip
    es_state = serialization.from_state_dict(es_state, checkpoint["es_state"])
    return es_state, checkpoint["key"], int(checkpoint["generation"]), json.loads(checkpoint["rows"])


def save_drift(path, args, drift_params, generation):
    config = dict(env=args.env, ppo_init=args.ppo_init, temporal=args.temporal, clip_eps=args.clip_eps)
    blob = {"config": json.dumps({**config, "generation": generation}), "params": jax.device_get(drift_params)}
    atomic_write(path, serialization.msgpack_serialize(blob))


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


# ---------------------------------------------------------------------------------------------------
# Outputs: fitness.csv and its plot; the drift as heat maps over (r, Â) like the paper's figures.


HEAT_MAP_R, HEAT_MAP_A = np.linspace(0.01, 2.0, 200), np.linspace(-3.0, 3.0, 121)  # every drift heat map's grid


def drift_maps(drift_fn):
    """D = drift_fn(r, Â) and the objective's slope ∂(r·Â − D)/∂r on the heat maps' grid, each (len(Â), len(r))."""
    r, a = (jnp.asarray(x.ravel(), jnp.float32) for x in np.meshgrid(HEAT_MAP_R, HEAT_MAP_A))
    slope = jax.vmap(jax.grad(lambda r, a: r * a - drift_fn(r, a)))
    drift, slope = jax.jit(lambda r, a: (drift_fn(r, a), slope(r, a)))(r, a)
    return (np.asarray(x).reshape(len(HEAT_MAP_A), len(HEAT_MAP_R)) for x in (drift, slope))


def heat_map(ax, z, title, **kw):
    """One (r, Â) heat map, with r = 1 and Â = 0 marked."""
    extent = (HEAT_MAP_R[0], HEAT_MAP_R[-1], HEAT_MAP_A[0], HEAT_MAP_A[-1])
    image = ax.imshow(z, origin="lower", aspect="auto", extent=extent, **kw)
    ax.axvline(1.0, color="k", lw=0.5, ls="--")
    ax.axhline(0.0, color="k", lw=0.5, ls="--")
    ax.set(xlabel="ratio r", ylabel="advantage Â", title=title)
    return image


def save_figure(fig, path):
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)


def plot_drift(path, args, drift_params):
    """Heat maps of D and of ∂(r·Â − D)/∂r over r ∈ (0, 2] × Â ∈ [−3, 3] (rows: n/N = 0, ½, 1 if temporal).
    Returns the share of the quadrant Â < 0, r < 1 − ε (where PPO's slope is 0) with a slope > 0.1: rollback."""
    progresses = (0.0, 0.5, 1.0) if args.temporal else (0.0,)
    fig = Figure(figsize=(11, 4 * len(progresses)), layout="tight")
    quadrant = (HEAT_MAP_A[:, None] < 0) & (HEAT_MAP_R[None, :] < 1 - args.clip_eps)
    rollback, drift_config = [], (args.ppo_init, args.clip_eps, args.temporal)
    for row, progress in zip(fig.subplots(len(progresses), 2, squeeze=False), progresses, strict=True):
        drift, slope = drift_maps(lambda r, a, p=progress: lpo_drift(drift_params, r, a, p, *drift_config))
        rollback.append(float((slope[quadrant] > 0.1).mean()))
        when = f" at n/N = {progress}" if args.temporal else ""
        fig.colorbar(heat_map(row[0], drift, f"drift D(r, Â){when}", cmap="viridis"), ax=row[0])
        fig.colorbar(heat_map(row[1], slope, f"∂(r·Â − D)/∂r{when} (> 0 for Â < 0: rollback)", cmap="RdBu_r",
                              vmin=-3, vmax=3), ax=row[1])  # fmt: skip
    save_figure(fig, path)
    return rollback


def write_outputs(out_dir, args, strategy, es_state, rows, extra):
    """drift.msgpack (the ES mean), fitness.csv, fitness.png, drift.png, summary.json."""
    out = lambda name: os.path.join(out_dir, name)
    drift_params, generation = strategy.get_mean(jax.device_get(es_state)), rows[-1]["generation"]
    save_drift(out("drift.msgpack"), args, drift_params, generation)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out("fitness.csv"), text.getvalue().encode())
    columns = ("generation", "fitness_mean", "fitness_std", "fitness_best")
    gens, mean, std, best = np.array([[r[k] for k in columns] for r in rows]).T  # float64: JSON-serialisable
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    ax.plot(gens, mean, label="population mean")
    ax.fill_between(gens, mean - std, mean + std, alpha=0.3, label="± std")
    ax.plot(gens, best, ".", ms=3, label="best member")
    ax.set(xlabel="generation", ylabel="final evaluation return", title=f"LPO meta-training on {args.env}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    save_figure(fig, out("fitness.png"))
    summary = dict(env=args.env, algo=ALGO, generations=generation, population_size=args.population_size,
                   fitness_mean_first=mean[0], fitness_mean_last=mean[-1], fitness_mean_best=np.nanmax(mean),
                   fitness_best_member=np.nanmax(best), rollback_share=plot_drift(out("drift.png"), args, drift_params),
                   generation_s_mean=np.mean([r["generation_s"] for r in rows]), **extra)  # fmt: skip
    atomic_write(out("summary.json"), json.dumps(summary, indent=2).encode())


def main(argv=None):
    warnings.filterwarnings("ignore", message="Brax System, piplines and environments are not actively")
    args, checkpoint = parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()  # before anything touches a device
    args = check_lpo_args(resolve_args(args))
    run_name = f"{args.env}__{ALGO}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = args.resume or args.out_dir or os.path.join("runs", run_name)
    lead = jax.process_index() == 0  # the one host that prints and writes

    strategy, lr = make_strategy(args)
    key, init_key, drift_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    mean = init_drift_params(drift_key, args.temporal)
    if args.init_drift:
        mean = load_drift(args.init_drift, args.temporal)[0]
    es_state, start, rows = strategy.init(init_key, mean, strategy.default_params), 0, []
    if checkpoint is not None:
        es_state, key, start, rows = load_checkpoint(args, checkpoint, es_state)
    if lead:
        os.makedirs(out_dir, exist_ok=True)
        config = dataclasses.asdict(args)
        atomic_write(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2).encode())
        print(f"{ALGO} on {args.env} → {out_dir}\n" + "\n".join(f"  {k} = {v}" for k, v in config.items()), flush=True)
    if start == args.generations:
        if lead:
            print(f"{out_dir} is already at generation {start}: raise --generations to continue it")
        return

    mesh = jax.make_mesh((jax.device_count(),), ("population",), (jax.sharding.AxisType.Auto,))
    # host copies: strongly typed, identical on every host, so a fresh and a restored state compile alike
    es_state, key = jax.device_put(jax.tree.map(np.asarray, (es_state, key)), NamedSharding(mesh, PartitionSpec()))
    start_time = time.perf_counter()
    generation = make_generation(args, strategy, mesh).lower(es_state, key).compile()
    compile_s = time.perf_counter() - start_time
    per_update = args.num_envs * args.num_steps * args.action_repeat
    member_steps = args.total_timesteps // per_update * per_update * args.num_rollouts
    extra = dict(env_steps_per_member=member_steps, devices=jax.device_count(), compile_s=round(compile_s, 2))
    if lead:
        print(f"compiled in {compile_s:.1f} s on {jax.device_count()} device(s); {member_steps:,} env steps per "
              f"member, {member_steps * args.population_size:,} per generation", flush=True)  # fmt: skip
    elapsed = rows[-1]["elapsed_s"] if rows else 0.0
    for g in range(start + 1, args.generations + 1):  # g: the generation being run, counted from 1
        start_time = time.perf_counter()
        es_state, key, returns, sigma = generation(es_state, key)
        returns, seconds = np.asarray(returns), time.perf_counter() - start_time
        elapsed += seconds
        failed = int(np.isnan(returns).sum())
        if failed == len(returns):
            raise SystemExit(f"error: every member's training diverged (NaN) at generation {g}")
        row = dict(generation=g, fitness_mean=float(np.nanmean(returns)), fitness_best=float(np.nanmax(returns)),
                   fitness_std=float(np.nanstd(returns)), nan_members=failed, sigma=float(sigma),
                   es_lr=float(lr(g - 1)), generation_s=round(seconds, 3), elapsed_s=round(elapsed, 3))  # fmt: skip
        rows.append(row)
        if not lead:
            continue
        sps = member_steps * args.population_size / seconds
        print(f"generation {g:>5}/{args.generations} | fitness mean {row['fitness_mean']:9.1f} "
              f"best {row['fitness_best']:9.1f} std {row['fitness_std']:8.1f} | NaN {failed} | σ {row['sigma']:.4f} | "
              f"{seconds:6.1f} s | {sps:9,.0f} steps/s | {elapsed:8.1f} s", flush=True)  # fmt: skip
        if g % args.save_every == 0 or g == args.generations:
            es_dict = serialization.to_state_dict(jax.device_get(es_state))
            checkpoint = dict(config=json.dumps(dataclasses.asdict(args)), generation=g, key=np.asarray(key),
                              es_state=es_dict, rows=json.dumps(rows))  # fmt: skip
            atomic_write(os.path.join(out_dir, "checkpoint.msgpack"), serialization.msgpack_serialize(checkpoint))
            write_outputs(out_dir, args, strategy, es_state, rows, extra)
    if lead and rows:
        print(f"{ALGO} {args.env}: fitness mean {rows[0]['fitness_mean']:.1f} at generation 1, "
              f"{rows[-1]['fitness_mean']:.1f} at {rows[-1]['generation']} | {out_dir}/drift.msgpack")  # fmt: skip


if __name__ == "__main__":
    main()

"""GAE with terminations and time-outs, the running observation statistics and the minibatch shuffle."""

import jax
import jax.numpy as jnp
import numpy as np

import ppo


def numpy_gae(rewards, values, next_values, terminations, truncations, gamma, lam):
    """One env at a time, one step at a time, straight from the definitions."""
    steps, num_envs = rewards.shape
    advantages = np.zeros_like(rewards)
    for env in range(num_envs):
        running = 0.0
        for t in reversed(range(steps)):
            episode_ends = terminations[t, env] or truncations[t, env]
            # the value after a terminal state is 0; after a time-out it is V(the state reached)
            bootstrap = 0.0 if terminations[t, env] else next_values[t, env]
            delta = rewards[t, env] + gamma * bootstrap - values[t, env]
            running = delta + (0.0 if episode_ends else gamma * lam * running)
            advantages[t, env] = running
    return advantages, advantages + values


def test_gae_matches_numpy_with_terminations_and_truncations():
    rng = np.random.default_rng(0)
    steps, num_envs = 50, 7
    rewards = rng.normal(size=(steps, num_envs)).astype(np.float32)
    values = rng.normal(size=(steps, num_envs)).astype(np.float32)
    next_values = rng.normal(size=(steps, num_envs)).astype(np.float32)
    terminations = rng.random((steps, num_envs)) < 0.08
    truncations = (rng.random((steps, num_envs)) < 0.08) & ~terminations
    assert terminations.any() and truncations.any()
    dones = terminations | truncations
    advantages, targets = ppo.compute_gae(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(next_values),
        jnp.asarray(terminations, jnp.float32), jnp.asarray(dones, jnp.float32), 0.97, 0.95,
    )  # fmt: skip
    expected_adv, expected_targets = numpy_gae(rewards, values, next_values, terminations, truncations, 0.97, 0.95)
    np.testing.assert_allclose(advantages, expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, expected_targets, rtol=1e-5, atol=1e-5)


def test_truncation_bootstraps_where_termination_does_not():
    ones = jnp.ones((1, 1))
    zeros = jnp.zeros((1, 1))
    # one step, reward 1, V(s) = 0, V(s') = 10, the episode ends at this step
    truncated, _ = ppo.compute_gae(ones, zeros, 10 * ones, zeros, ones, 0.9, 0.95)
    terminated, _ = ppo.compute_gae(ones, zeros, 10 * ones, ones, ones, 0.9, 0.95)
    assert float(truncated[0, 0]) == 1.0 + 0.9 * 10.0
    assert float(terminated[0, 0]) == 1.0


def test_running_obs_stats_match_numpy_over_all_batches():
    rng = np.random.default_rng(1)
    batches = [rng.normal(loc=3.0, scale=2.0, size=(n, 5, 4)).astype(np.float32) for n in (3, 10, 1, 7)]
    stats = ppo.init_obs_stats(4)
    for batch in batches:
        stats = ppo.update_obs_stats(stats, jnp.asarray(batch))
    everything = np.concatenate([b.reshape(-1, 4) for b in batches])
    assert int(stats.count) == everything.shape[0]
    np.testing.assert_allclose(stats.mean, everything.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.var, everything.var(0), rtol=1e-4)
    normalised = ppo.normalize_obs(stats, jnp.asarray(everything))
    np.testing.assert_allclose(np.asarray(normalised).mean(0), 0.0, atol=1e-4)
    assert float(jnp.abs(ppo.normalize_obs(stats, jnp.full((4,), 1e6))).max()) == 5.0  # clipped


def test_minibatch_shuffle_is_a_uniform_permutation():
    for n in (1, 2, 1000, 163_840, 2**20 + 1):  # the last one past the packed keys: jax's exact shuffle
        order = np.asarray(ppo.shuffled_indices(jax.random.PRNGKey(n), n))
        assert np.array_equal(np.sort(order), np.arange(n)), f"not a permutation at n = {n}"
    # over 4,000 shuffles of 64 samples into 4 minibatches, every sample joins every minibatch ~1/4 of the time
    n, minibatches, draws = 64, 4, 4000
    orders = np.asarray(jax.vmap(lambda k: ppo.shuffled_indices(k, n))(jax.random.split(jax.random.PRNGKey(0), draws)))
    minibatch_of = np.empty_like(orders)
    np.put_along_axis(minibatch_of, orders, np.arange(n) // (n // minibatches), axis=1)
    frequency = (minibatch_of[..., None] == np.arange(minibatches)).mean(0)
    assert np.abs(frequency - 1 / minibatches).max() < 0.035  # binomial std 0.007
    # at 2^20 samples only 12 random bits are left: neighbours must still share one of 32 minibatches ~1/32 of
    # the time (ties add ~1/4,096), not as a block
    n = 2**20
    minibatch_of = np.empty(n, int)
    minibatch_of[np.asarray(ppo.shuffled_indices(jax.random.PRNGKey(1), n))] = np.arange(n) // (n // 32)
    assert abs(np.mean(minibatch_of[:-1] == minibatch_of[1:]) - 1 / 32) < 0.002  # binomial std 0.00017

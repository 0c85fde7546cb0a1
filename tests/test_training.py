"""In-process training: ppo.py and dpo.py learn; a saved policy acts exactly as the trained one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpo
import ppo

# inverted_pendulum at a CPU-sized budget; its preset (2048 envs × 80 steps) suits a GPU
LEARN = dict(env="inverted_pendulum", total_timesteps=2_000_000, num_envs=128, num_steps=32, num_minibatches=4,
             hidden_sizes=(64, 64), num_eval_envs=32)  # fmt: skip


@pytest.mark.parametrize("module", [ppo, dpo], ids=["ppo", "dpo"])
def test_learns_inverted_pendulum(module):
    args = module.resolve_args(module.Args(**LEARN))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(1))
    _, eval_returns = jax.jit(module.make_train(args))(keys)
    assert float(eval_returns.mean()) >= 800.0  # the maximum is 1000: balanced for the whole episode


def test_save_load_gives_identical_actions(tmp_path):
    tiny = dict(total_timesteps=2048, num_envs=32, num_steps=16, num_minibatches=4, update_epochs=1)
    args = ppo.resolve_args(ppo.Args(env="hopper", hidden_sizes=(16, 16), num_eval_envs=2, episode_length=20, **tiny))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
    runners, _ = jax.jit(ppo.make_train(args))(keys)
    path = str(tmp_path / "params.msgpack")
    ppo.save_policy(path, args, runners.params, runners.obs_stats)

    init, policy, _ = ppo.make_networks(args, 11, 3)  # hopper: 11 observations, 3 actions
    obs = jax.random.normal(jax.random.PRNGKey(7), (5, 11)) * 3
    for seed_index in (0, 1):
        act, loaded_args = ppo.load_policy(path, seed_index)
        assert loaded_args == args
        params, stats = jax.tree.map(lambda x, i=seed_index: x[i], (runners.params, runners.obs_stats))
        expected = jnp.tanh(policy(params, ppo.normalize_obs(stats, obs))[0])
        np.testing.assert_array_equal(act(obs), expected)
    # the two seeds trained different policies, so the test would notice a seed mix-up
    assert not np.array_equal(ppo.load_policy(path, 0)[0](obs), ppo.load_policy(path, 1)[0](obs))


def test_preset_fills_only_what_the_user_left_unset():
    args = ppo.resolve_args(ppo.Args(env="ant", gamma=0.9))
    assert args.gamma == 0.9
    preset = ppo.resolve_args(ppo.Args(env="ant"))
    assert all(getattr(preset, name) is not None for name in ppo.PRESET_FIELDS)
    assert preset.total_timesteps == 30_000_000 and preset.gamma == 0.97 and preset.reward_scaling == 10.0

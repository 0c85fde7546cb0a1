"""Training: ppo.py and dpo.py learn; a saved policy acts exactly as it did before saving."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro

import dpo
import lpo_meta
import ppo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# inverted_pendulum's cpu preset through the command line a user types (rewards normalised and the learning rate
# annealed: the tier's own). 1000 is the pole up for the whole episode, and every seed of both scripts must get within
# 5% of it: the learner, not the bound, absorbs the seed-to-seed and CPU-to-CPU differences (8 seeds of each
# measured: bench/README.md, the inverted_pendulum table). Fewer evaluation episodes than a user's: only the speed.
LEARN = ["--env", "inverted_pendulum", "--preset", "cpu", "--num-seeds", "4", "--num-eval-envs", "32"]
MIN_RETURN = 950.0


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ppo.py", "dpo.py"])
def test_learns_inverted_pendulum(script, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *LEARN, "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    per_seed = json.loads((tmp_path / "summary.json").read_text())["eval_return_per_seed"]
    print(f"{script}: eval return per seed {per_seed}")
    assert min(per_seed) >= MIN_RETURN


@pytest.mark.parametrize("per_network", [True, False])
def test_gradient_clip_bounds_each_network_or_both_together(per_network):
    # a policy gradient of norm 0.3 beside a value gradient of norm 40, as a large value loss gives
    grads = {"actor": {"w": np.full((4, 4), 0.05), "b": np.full(4, 0.05)}, "log_std": np.full(2, 0.1),
             "critic": {"w": np.full((4, 1), 20.0)}}  # fmt: skip
    grads = jax.tree.map(np.float32, grads)
    clip = ppo.gradient_clip(ppo.Args(max_grad_norm=0.5, clip_per_network=per_network))
    clipped, _ = clip.update(grads, clip.init(grads))
    norm = lambda tree: np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree)))
    policy = lambda tree: {k: v for k, v in tree.items() if k != "critic"}
    if per_network:  # the policy's gradient is under the bound and stays as it is; the value gradient is cut to it
        jax.tree.map(np.testing.assert_allclose, policy(clipped), policy(grads))
        np.testing.assert_allclose(norm(clipped["critic"]), 0.5, rtol=1e-6)
    else:  # one factor for all, set by the value gradient
        factor = 0.5 / norm(grads)
        jax.tree.map(lambda c, g: np.testing.assert_allclose(c, g * factor, rtol=1e-6), clipped, grads)
    off = ppo.gradient_clip(ppo.Args(max_grad_norm=0.0, clip_per_network=per_network))
    jax.tree.map(np.testing.assert_array_equal, off.update(grads, off.init(grads))[0], grads)


def test_save_load_gives_identical_actions(tmp_path):
    args = ppo.resolve_args(ppo.Args(env="inverted_pendulum", hidden_sizes=(16, 16), num_envs=32, num_steps=16))
    init, policy, _ = ppo.make_networks(args, 4, 1)  # inverted_pendulum: 4 observations, 1 action
    # two seeds' policies and normalisers, as training leaves them: a leading seed axis on every leaf; the
    # statistics are far from the identity, so that a lost or mixed-up normaliser would change the actions
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = jax.jit(jax.vmap(init))(keys[:2])
    stats = ppo.ObsStats(
        jnp.full(2, 1e4), jax.random.normal(keys[2], (2, 4)), jnp.exp(jax.random.normal(keys[3], (2, 4)))
    )
    path = str(tmp_path / "params.msgpack")
    ppo.save_policy(path, args, params, stats)

    obs = jax.random.normal(jax.random.PRNGKey(7), (5, 4)) * 3
    for seed_index in (0, 1):
        act, loaded_args = ppo.load_policy(path, seed_index)
        assert loaded_args == args
        one_params, one_stats = jax.tree.map(lambda x, i=seed_index: x[i], (params, stats))
        # compiled as load_policy compiles act: XLA's CPU kernels round differently with other options
        mean = lambda o, p=one_params, s=one_stats: policy(p, ppo.normalize_obs(s, o))[0]
        expected = jax.jit(lambda o, mean=mean: ppo.env_action(mean(o), args.tanh_squash),
                           compiler_options=ppo.compiler_options())(obs)  # fmt: skip
        np.testing.assert_array_equal(act(obs), expected)
    # the two seeds' policies differ, so the test would notice a seed mix-up
    assert not np.array_equal(ppo.load_policy(path, 0)[0](obs), ppo.load_policy(path, 1)[0](obs))


def test_preset_fills_only_what_the_user_left_unset():
    args = ppo.resolve_args(ppo.Args(env="ant", gamma=0.9, preset="paper"))
    assert args.gamma == 0.9 and args.preset == "paper"
    paper = ppo.resolve_args(ppo.Args(env="ant", preset="paper"))
    assert all(getattr(paper, name) is not None for name in ppo.PRESET_FIELDS)
    assert paper.total_timesteps == 30_000_000 and paper.gamma == 0.97 and paper.max_grad_norm == 0.0
    cpu = ppo.resolve_args(ppo.Args(env="ant", preset="cpu", hidden_sizes=(64, 64)))
    assert cpu.preset == "cpu" and cpu.hidden_sizes == (64, 64)  # the user's value wins over the tier's
    assert all(getattr(cpu, k) == v for k, v in ppo.CPU_PRESETS["ant"].items())
    assert cpu.learning_rate == paper.learning_rate  # a field the cpu tier leaves alone comes from the paper tier
    # a field the tier holds per algorithm: ppo.py's clipping range on ant; dpo.py has none, lpo_meta.py the paper's
    assert (
        paper.clip_eps
        == ppo.PAPER_COMMON["clip_eps"]
        != cpu.clip_eps
        == ppo.CPU_PRESETS_PER_ALGO["ant", "ppo"]["clip_eps"]
    )
    assert ppo.resolve_args(ppo.Args(env="ant", preset="cpu", clip_eps=0.25)).clip_eps == 0.25
    assert lpo_meta.resolve_args(lpo_meta.Args(env="ant", preset="cpu")).clip_eps == 0.2
    assert not hasattr(dpo.resolve_args(dpo.Args(env="ant", preset="cpu")), "clip_eps")
    # switches a tier may set: on in the pendulums' cpu tiers, off elsewhere; --no-... on the command line wins
    resolve = lambda *argv: ppo.resolve_args(tyro.cli(ppo.Args, args=["--env", *argv]))
    switches = lambda a: (a.anneal_lr, a.normalize_rewards)
    assert switches(cpu) == switches(paper) == (False, False)
    assert switches(resolve("inverted_pendulum", "--preset", "cpu")) == (True, True)
    assert switches(resolve("inverted_double_pendulum", "--preset", "cpu")) == (True, True)
    assert switches(resolve("inverted_pendulum", "--preset", "paper")) == (False, False)
    assert switches(resolve("inverted_pendulum", "--preset", "cpu", "--no-anneal-lr")) == (False, True)
    assert switches(resolve("ant", "--preset", "cpu", "--normalize-rewards")) == (False, True)


def test_auto_preset_is_the_cpu_tier_on_a_cpu_and_paper_without_a_cpu_entry():
    assert jax.default_backend() == "cpu"
    assert ppo.resolve_args(ppo.Args(env="ant")).preset == "cpu"
    assert "swimmer" not in ppo.CPU_PRESETS
    assert ppo.resolve_args(ppo.Args(env="swimmer")).preset == "paper"
    with pytest.raises(SystemExit, match="has no cpu preset"):
        ppo.resolve_args(ppo.Args(env="swimmer", preset="cpu"))

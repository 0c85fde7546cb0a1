"""lpo_meta.py: the learnt drift's guarantees, and tiny meta-runs: their files, resume, sharding, bad input."""

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

import lpo_meta
import ppo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIOS = jnp.linspace(0.05, 3.0, 60)
ADVANTAGES = jnp.array([-3.0, -1.7, -1.0, -0.5, -0.1, 0.0, 0.1, 0.5, 1.0, 2.3, 3.0])
R, A = (x.ravel() for x in jnp.meshgrid(RATIOS, ADVANTAGES))
# inverted_pendulum with a budget of 8 updates: the whole inner run compiles in seconds and runs in a blink
TINY = ["--env", "inverted_pendulum", "--total-timesteps", "4096", "--num-envs", "32", "--num-steps", "16",
        "--num-minibatches", "4", "--hidden-sizes", "16", "16", "--num-eval-envs", "8", "--episode-length", "100",
        "--population-size", "4", "--save-every", "1"]  # fmt: skip
FILES = ("checkpoint.msgpack", "config.json", "drift.msgpack", "fitness.csv", "fitness.png", "drift.png",
         "summary.json")  # fmt: skip


def random_params(temporal, seed, scale=1.0):
    """A drift network far from zero: the guarantees must hold for any parameters the ES may reach."""
    leaves, tree = jax.tree.flatten(lpo_meta.init_drift_params(jax.random.PRNGKey(0), temporal))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


def test_the_es_starts_from_ppo():
    start = lpo_meta.init_drift_params(jax.random.PRNGKey(0))  # the ES mean's start: its output layer is zero
    drift = lpo_meta.lpo_drift(start, R, A, 0.0, True, 0.2, False)
    ppo_drift = ppo.ppo_drift(R, A, 0.2)
    # exactly ReLU(D_PPO − 1e-4): the 1e-4 margin is what keeps every learnt drift flat at r = 1
    np.testing.assert_array_equal(drift, jax.nn.relu(ppo_drift - 1e-4))
    assert float(jnp.max(jnp.abs(drift - ppo_drift))) <= 1.01e-4  # 1e-4, plus float32 rounding of D_PPO − 1e-4

    def objective_slope(drift_fn):
        return jax.vmap(jax.grad(lambda r, a: r * a - drift_fn(r, a)))(R, A)

    lpo_slope = objective_slope(lambda r, a: lpo_meta.lpo_drift(start, r, a, 0.0, True, 0.2, False))
    ppo_slope = objective_slope(lambda r, a: ppo.ppo_drift(r, a, 0.2))
    # so the policy gradient is PPO's, bit for bit, except where 0 < D_PPO ≤ 1e-4 (a sliver beside r = 1 ± ε)
    same = (ppo_drift == 0) | (ppo_drift > 1e-4)
    assert float(same.mean()) > 0.99
    np.testing.assert_array_equal(lpo_slope[same], ppo_slope[same])


@pytest.mark.parametrize("ppo_init", [True, False])
@pytest.mark.parametrize("temporal", [False, True])
def test_learnt_drift_is_nonnegative_zero_and_flat_at_ratio_one(temporal, ppo_init):
    ones = jnp.ones_like(ADVANTAGES)
    for seed in range(3):
        params = random_params(temporal, seed)
        for progress in (0.0, 0.37, 1.0):
            drift = lambda r, a, p=params, n=progress: lpo_meta.lpo_drift(p, r, a, n, ppo_init, 0.2, temporal)
            values = drift(R, A)
            assert jnp.all(values >= 0)
            assert jnp.any(values > 0.1)  # not trivially zero
            np.testing.assert_array_equal(drift(ones, ADVANTAGES), 0.0)
            np.testing.assert_array_equal(jax.vmap(jax.grad(drift))(ones, ADVANTAGES), 0.0)
            for beside in (jnp.nextafter(ones, 2.0), jnp.nextafter(ones, 0.0)):  # zero around r = 1, not only at it
                np.testing.assert_array_equal(drift(beside, ADVANTAGES), 0.0)


@pytest.mark.parametrize("temporal", [False, True])
def test_learnt_drift_has_finite_gradients_where_the_ratio_underflows(temporal):
    log_r = jnp.array([-10.0, -90.0, -200.0])  # exp underflows to 0 past −103: log r of the features must not be −inf
    params = random_params(temporal, 3)
    for a in (-1.0, 0.0, 1.0):
        drift = lambda x, a=a: lpo_meta.lpo_drift(params, jnp.exp(x), a, 0.5, True, 0.2, temporal)
        assert jnp.all(jnp.isfinite(jax.vmap(jax.grad(drift))(log_r)))


def test_antithetic_pairs_around_the_start_are_different_drifts():
    # θ and −θ are the same drift (tanh is odd, no biases): an all-zero start would give the ES a zero gradient
    start, noise = lpo_meta.init_drift_params(jax.random.PRNGKey(0)), random_params(False, 1, 0.04)
    plus, minus = (jax.tree.map(lambda m, z, s=sign: m + s * z, start, noise) for sign in (1, -1))
    zero_plus, zero_minus = (jax.tree.map(lambda z, s=sign: s * z, noise) for sign in (1, -1))
    drift = lambda params: lpo_meta.lpo_drift(params, R, A, 0.0, False, 0.2, False)
    np.testing.assert_array_equal(drift(zero_plus), drift(zero_minus))
    assert float(jnp.abs(drift(plus) - drift(minus)).max()) > 1e-3


def test_only_a_temporal_drift_changes_over_a_run():
    static, temporal = random_params(False, 0), random_params(True, 0)
    for params, is_temporal in ((static, False), (temporal, True)):
        early, late = (lpo_meta.lpo_drift(params, R, A, p, False, 0.2, is_temporal) for p in (0.0, 1.0))
        assert bool(jnp.any(early != late)) == is_temporal


def test_a_diverged_member_ranks_as_the_worst():
    args = lpo_meta.Args(env="inverted_pendulum", population_size=4)
    for shaping in ("centered_rank", "z_score"):
        strategy, _ = lpo_meta.make_strategy(lpo_meta.dataclasses.replace(args, fitness_shaping=shaping))
        fitness = jnp.array([-5.0, jnp.nan, -1.0, -3.0])  # evosax minimises: −1 is the worst return here
        shaped = strategy.fitness_shaping_fn(None, fitness, None, None)
        assert jnp.all(jnp.isfinite(shaped))
        assert shaped[1] == shaped.max() == shaped[2]


def read_run(out_dir):
    params, config = lpo_meta.load_drift(os.path.join(out_dir, "drift.msgpack"))
    with open(os.path.join(out_dir, "fitness.csv")) as f:
        rows = list(csv.DictReader(f))
    return params, config, rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny meta-runs: 2 generations resumed for 2 more, 4 straight, and 4 on 2 forced host devices."""
    base = tmp_path_factory.mktemp("lpo")
    # the sharded run needs its own process (XLA_FLAGS is read at start-up); it overlaps the runs below
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    sharded = subprocess.Popen([sys.executable, "lpo_meta.py", *TINY, "--generations", "4", "--out-dir",
                                str(base / "sharded")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    # the three in-process runs compile the same program: XLA's disk cache compiles it once
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.set_cache_dir(str(base / "xla_cache"))
    compilation_cache.reset_cache()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            lpo_meta.main([*TINY, "--generations", "2", "--out-dir", str(base / "resumed")])
            first_two = read_run(base / "resumed")
            lpo_meta.main(["--resume", str(base / "resumed"), "--generations", "4"])  # the saved config is the default
            lpo_meta.main([*TINY, "--generations", "4", "--out-dir", str(base / "straight")])
            # a NaN drift makes every member's training diverge (the program is the same: the mean is an input)
            nan_drift = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), first_two[0])
            lpo_meta.save_drift(str(base / "nan.msgpack"), lpo_meta.Args(env="inverted_pendulum"), nan_drift, 0)
            with pytest.raises(SystemExit) as diverged:
                lpo_meta.main([*TINY, "--init-drift", str(base / "nan.msgpack"), "--out-dir", str(base / "nan")])
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
        compilation_cache.reset_cache()
    output, _ = sharded.communicate(timeout=900)
    assert sharded.returncode == 0, output
    return base, first_two, log.getvalue(), output, str(diverged.value)


@pytest.mark.slow
def test_a_tiny_meta_run_writes_every_file(runs):
    base, (params, config, rows), log, *_ = runs
    for name in FILES:
        assert os.path.getsize(base / "straight" / name) > 0, name
    for name in ("fitness.png", "drift.png"):
        with open(base / "straight" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert config == dict(env="inverted_pendulum", ppo_init=True, temporal=False, clip_eps=0.2, generation=2)
    assert [int(r["generation"]) for r in rows] == [1, 2]
    assert {"fitness_mean", "fitness_best", "fitness_std", "sigma", "generation_s"} <= set(rows[0])
    for row in rows:
        assert 0 < float(row["fitness_mean"]) <= float(row["fitness_best"]) <= 100  # returns of 100-step episodes
        assert float(row["sigma"]) == pytest.approx(0.04)
    # the ES moved the mean away from zero
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(params))
    summary = json.loads((base / "straight" / "summary.json").read_text())
    assert summary["generations"] == 4 and summary["population_size"] == 4 and summary["devices"] == 1
    # one progress line per generation: 2, then 2 more resumed, then 4 straight
    assert sum(line.startswith("generation ") for line in log.splitlines()) == 8


@pytest.mark.slow
def test_resume_reaches_the_state_of_an_uninterrupted_run(runs):
    base = runs[0]
    resumed, straight = read_run(base / "resumed"), read_run(base / "straight")
    jax.tree.map(np.testing.assert_array_equal, resumed[0], straight[0])
    assert [r["fitness_mean"] for r in resumed[2]] == [r["fitness_mean"] for r in straight[2]]
    assert len(straight[2]) == 4


@pytest.mark.slow
def test_two_devices_give_the_result_of_one(runs):
    base, _, _, output, _ = runs
    params, _, rows = read_run(base / "straight")
    sharded_params, _, sharded_rows = read_run(base / "sharded")
    assert "on 2 device(s)" in output
    assert json.loads((base / "sharded" / "summary.json").read_text())["devices"] == 2
    assert [r["fitness_mean"] for r in sharded_rows] == [r["fitness_mean"] for r in rows]
    jax.tree.map(np.testing.assert_array_equal, sharded_params, params)


@pytest.mark.slow
def test_a_generation_where_every_member_diverges_stops_the_run(runs):
    # inverted_pendulum scores NaN actions as a perfect balance: the NaN comes from the trained parameters
    assert runs[4] == "error: every member's training diverged (NaN) at generation 1"


@pytest.mark.slow
def test_resuming_a_finished_run_does_nothing(runs, capsys):
    lpo_meta.main(["--resume", str(runs[0] / "straight")])  # no compile: it returns at once
    assert "already at generation 4" in capsys.readouterr().out


def run_error(argv):
    with pytest.raises(SystemExit) as error:
        lpo_meta.main(argv)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_input_fails_in_one_line_before_compiling(tmp_path):
    assert "even" in run_error([*TINY, "--population-size", "5"])  # the last of a repeated flag wins
    assert "--sigma" in run_error([*TINY, "--sigma-init", "0.01", "--sigma-limit", "0.1"])
    assert "cannot read" in run_error([*TINY, "--resume", str(tmp_path)])
    drift = str(tmp_path / "drift.msgpack")
    lpo_meta.save_drift(drift, lpo_meta.Args(), lpo_meta.init_drift_params(jax.random.PRNGKey(0)), 0)
    assert "expected" in run_error([*TINY, "--temporal", "--init-drift", drift])
    (tmp_path / "junk.msgpack").write_bytes(b"not a drift")
    assert "cannot read a drift" in run_error([*TINY, "--init-drift", str(tmp_path / "junk.msgpack")])


@pytest.mark.slow
def test_a_resume_with_another_config_fails_in_one_line(runs):
    base = runs[0]
    message = run_error([*TINY, "--generations", "4", "--sigma-init", "0.05", "--resume", str(base / "straight")])
    assert "--sigma-init was 0.04, now 0.05" in message
    assert "past --generations" in run_error([*TINY, "--generations", "3", "--resume", str(base / "straight")])


def test_help_says_what_the_seed_seeds(capsys):
    with pytest.raises(SystemExit) as done:
        lpo_meta.main(["--help"])
    assert done.value.code == 0
    assert "Seed of the meta-training" in " ".join(capsys.readouterr().out.split())

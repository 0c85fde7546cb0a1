"""eval_transfer.py: a tiny evaluation writes every output, resumes, and loads a drift written by lpo_meta.py."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eval_transfer
import ppo

TINY = (
    "--num-seeds 2 --num-envs 16 --num-steps 8 --num-minibatches 4 --total-timesteps 1024 "
    "--hidden-sizes 16 16 --num-eval-envs 4 --episode-length 50"
).split()  # 8 updates of 128 steps
ENVS, ALGOS = ["fast", "inverted_pendulum"], ["ppo", "dpo"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two envs × PPO and DPO, two seeds each: four cells, four compiles."""
    out = str(tmp_path_factory.mktemp("transfer"))
    argv = ["--envs", *ENVS, "--algos", *ALGOS, "--results-dir", out, *TINY]
    eval_transfer.main(argv)
    return out, argv


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_every_output(tiny_run):
    out, _ = tiny_run
    rows = read_csv(os.path.join(out, "results.csv"))
    assert list(rows[0]) == ["env", "algo", "seed", "eval_return"]
    assert [(r["env"], r["algo"], int(r["seed"])) for r in rows] == [
        (env, algo, seed) for env in ENVS for algo in ALGOS for seed in (0, 1)
    ]
    assert all(np.isfinite(float(r["eval_return"])) for r in rows)
    with open(os.path.join(out, "results.json")) as f:
        assert [{k: str(v) for k, v in r.items()} for r in json.load(f)] == rows

    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert "| env | env steps | ppo | dpo |" in table
    for env in ENVS:
        line = next(line for line in table.splitlines() if line.startswith(f"| {env} | 1,024 |"))
        assert line.count("[") == 2 and "**" in line and "×" in line  # intervals, the best in bold, ratio to PPO
    for name in ("curves.png", "drifts.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    for env in ENVS:
        for algo in ALGOS:
            cell = read_json(os.path.join(out, "cells", f"{env}__{algo}.json"))
            assert cell["env"] == env and cell["algo"] == algo and cell["seeds"] == [0, 1]
            assert cell["env_steps"] == 1024 and len(cell["eval_return_per_seed"]) == 2
            assert cell["curve"]["env_steps"] == [128 * (i + 1) for i in range(8)]  # every update
            assert np.shape(cell["curve"]["train_return"]) == (8, 2)  # updates × seeds
            assert cell["fingerprint"] == eval_transfer.fingerprint(cell["config"])


def test_rerun_skips_finished_cells(tiny_run, capsys):
    out, argv = tiny_run
    cells = os.path.join(out, "cells")
    before = {name: os.path.getmtime(os.path.join(cells, name)) for name in os.listdir(cells)}
    eval_transfer.main(argv)
    assert capsys.readouterr().out.count("already done") == 4
    assert before == {name: os.path.getmtime(os.path.join(cells, name)) for name in os.listdir(cells)}


def test_a_cell_saved_with_other_settings_is_recomputed(tiny_run, monkeypatch, capsys):
    out, argv = tiny_run
    path = os.path.join(out, "cells", "fast__dpo.json")
    cell = read_json(path)
    eval_transfer.atomic_write(path, json.dumps({**cell, "fingerprint": "stale"}).encode())
    recomputed = []
    monkeypatch.setattr(eval_transfer, "run_cell", lambda args, path: recomputed.append(path) or cell)
    eval_transfer.main(argv)
    assert recomputed == [path]
    assert "other settings; recomputing" in capsys.readouterr().out
    eval_transfer.atomic_write(path, json.dumps(cell).encode())


def test_only_what_a_cell_uses_is_in_its_fingerprint():
    base = eval_transfer.resolve_cells(eval_transfer.Args(envs=["fast"], algos=["ppo", "dpo"]))
    ppo_args, dpo_args = base["fast", "ppo"], base["fast", "dpo"]
    config = eval_transfer.cell_config
    assert config(ppo_args) == config(eval_transfer.dataclasses.replace(ppo_args, dpo_alpha=1.0, log_every=1))
    assert config(ppo_args) != config(eval_transfer.dataclasses.replace(ppo_args, clip_eps=0.3))
    assert config(dpo_args) == config(eval_transfer.dataclasses.replace(dpo_args, clip_eps=0.3))
    assert config(dpo_args) != config(eval_transfer.dataclasses.replace(dpo_args, dpo_beta=0.5))
    assert config(ppo_args) != config(eval_transfer.dataclasses.replace(ppo_args, seed=1))


def test_ppo_cell_matches_ppo_py(tiny_run):
    """Same settings and seeds through ppo.py's own make_train give the same numbers: only the drift is a
    parameter, and a cell is deterministic."""
    out, _ = tiny_run
    cell = read_json(os.path.join(out, "cells", "fast__ppo.json"))
    shared = {k: v for k, v in cell["config"].items() if k in ppo.Args.__dataclass_fields__}
    args = ppo.Args(**{**shared, "hidden_sizes": tuple(shared["hidden_sizes"])})
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(args.seed, args.seed + args.num_seeds))
    _, eval_returns = jax.jit(ppo.make_train(args), compiler_options=ppo.compiler_options())(keys)
    np.testing.assert_array_equal(np.asarray(eval_returns).mean(axis=1), cell["eval_return_per_seed"])


def test_bootstrap_interval_matches_a_plain_numpy_loop():
    values = np.array([812.0, 655.5, 930.25, 701.0])
    low, high = eval_transfer.bootstrap_ci(values, num_resamples=10_000)
    rng = np.random.default_rng(123)  # another stream: agreement up to Monte Carlo error
    means = []
    for _ in range(10_000):
        sample = [values[rng.integers(len(values))] for _ in range(len(values))]
        means.append(sum(sample) / len(sample))
    ref_low, ref_high = np.percentile(means, 2.5), np.percentile(means, 97.5)
    assert abs(low - ref_low) < 0.02 * (ref_high - ref_low)
    assert abs(high - ref_high) < 0.02 * (ref_high - ref_low)
    assert low < values.mean() < high
    assert eval_transfer.bootstrap_ci(values) == (low, high)  # fixed seed: the same interval every time
    assert eval_transfer.bootstrap_ci([5.0]) == (5.0, 5.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--envs", "fast", "moon"], "unknown env 'moon'"),
        (["--envs", "fast", "--algos", "ppo", "trpo"], "unknown algo 'trpo'"),
        (["--envs", "fast", "--algos", "lpo"], "--algos lpo needs --drift"),
        (["--envs", "fast", "--algos", "lpo", "--drift", "no/such/drift.msgpack"], "no/such/drift.msgpack"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path):
    with pytest.raises(SystemExit) as error:
        eval_transfer.main([*argv, "--results-dir", str(tmp_path)])
    text = str(error.value)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not os.listdir(tmp_path)  # nothing written, nothing compiled


def test_mismatched_drift_shape_is_a_one_line_error(tmp_path):
    import lpo_meta

    path = str(tmp_path / "drift.msgpack")
    args = lpo_meta.Args(env="fast", temporal=True)  # the file claims 16 features but holds an 8-feature network
    lpo_meta.save_drift(path, args, lpo_meta.init_drift_params(jax.random.PRNGKey(0), temporal=False), 0)
    with pytest.raises(SystemExit) as error:
        eval_transfer.main(["--envs", "fast", "--algos", "lpo", "--drift", path, "--results-dir", str(tmp_path / "o")])
    assert str(error.value).startswith("error: ") and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "o")


def test_a_drift_from_lpo_meta_loads_and_trains(tmp_path):
    import lpo_meta

    meta_dir = str(tmp_path / "meta")
    lpo_meta.main(["--env", "fast", *TINY[2:], "--population-size", "2", "--generations", "1", "--out-dir", meta_dir])
    drift = os.path.join(meta_dir, "drift.msgpack")
    out = str(tmp_path / "transfer")
    eval_transfer.main(["--envs", "fast", "--algos", "lpo", "--drift", drift, "--results-dir", out, *TINY])
    cell = read_json(os.path.join(out, "cells", "fast__lpo.json"))
    assert np.all(np.isfinite(cell["eval_return_per_seed"])) and "drift_sha256" in cell["config"]
    with open(os.path.join(out, "results.md")) as f:
        assert "LPO drift: " in f.read()

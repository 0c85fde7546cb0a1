"""eval_transfer.py: a tiny evaluation writes every output, resumes, trains each cell as ppo.py and dpo.py would,
keeps a row's settings equal, and loads a drift written by lpo_meta.py."""

import ast
import csv
import dataclasses
import json
import os
import pathlib

import jax
import numpy as np
import pytest

import dpo
import eval_transfer
import lpo_meta
import ppo

TINY = (
    "--num-seeds 2 --num-envs 16 --num-steps 8 --num-minibatches 4 --total-timesteps 1024 "
    "--hidden-sizes 16 16 --num-eval-envs 4 --episode-length 50 --num-evals 4"
).split()  # 8 updates of 128 steps, an evaluation every second
ENVS, ALGOS = ["fast"], ["ppo", "dpo"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One env × PPO and DPO, two seeds each: two cells, two compiles."""
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
            assert cell["curve"]["eval_env_steps"] == [256, 512, 768, 1024]
            assert np.shape(cell["curve"]["eval_return"]) == (4, 2)  # evaluations × seeds
            np.testing.assert_allclose(cell["curve"]["eval_return"][-1], cell["eval_return_per_seed"], rtol=1e-6)
            assert cell["machine"] in table
            assert cell["fingerprint"] == eval_transfer.fingerprint(cell["config"])


def test_rerun_skips_finished_cells(tiny_run, capsys):
    out, argv = tiny_run
    cells = os.path.join(out, "cells")
    before = {name: os.path.getmtime(os.path.join(cells, name)) for name in os.listdir(cells)}
    outputs = ("results.md", "results.csv", "results.json", "curves.png", "drifts.png")
    written = {name: pathlib.Path(out, name).read_bytes() for name in outputs}
    eval_transfer.main(argv)
    assert capsys.readouterr().out.count("already done") == len(ENVS) * len(ALGOS)
    assert before == {name: os.path.getmtime(os.path.join(cells, name)) for name in os.listdir(cells)}
    assert written == {name: pathlib.Path(out, name).read_bytes() for name in outputs}  # byte for byte


def test_a_cell_saved_with_other_settings_is_recomputed(tiny_run, monkeypatch, capsys):
    out, argv = tiny_run
    path = os.path.join(out, "cells", "fast__dpo.json")
    cell = read_json(path)
    ppo.atomic_write(path, json.dumps({**cell, "fingerprint": "stale"}).encode())
    recomputed = []
    monkeypatch.setattr(eval_transfer, "run_cell", lambda args, algo, c, path, drift: recomputed.append(path) or cell)
    eval_transfer.main(argv)
    assert recomputed == [path]
    assert "other settings; recomputing" in capsys.readouterr().out
    ppo.atomic_write(path, json.dumps(cell).encode())


def test_only_what_a_cell_uses_is_in_its_fingerprint():
    def config(algo, **changes):
        args = eval_transfer.Args(envs=["fast"], algos=["ppo", "dpo"], **changes)
        return eval_transfer.cell_config(args, algo, eval_transfer.resolve_cells(args)[0]["fast", algo])

    assert config("ppo") == config("ppo", dpo_alpha=1.0, log_every=1, num_bootstrap=10)
    assert config("ppo") != config("ppo", clip_eps=0.3)
    assert config("dpo") == config("dpo", clip_eps=0.3)
    assert config("dpo") != config("dpo", dpo_beta=0.5)
    assert config("ppo") != config("ppo", seed=1)
    assert config("ppo") != config("ppo", num_seeds=3)


@pytest.mark.parametrize("script", [ppo, pytest.param(dpo, marks=pytest.mark.slow)], ids=["ppo", "dpo"])
def test_a_cell_trains_as_its_script_does(script, tiny_run, tmp_path):
    """The same command through ppo.py or dpo.py gives the cell's per-seed returns, to the last bit."""
    out, _ = tiny_run
    script.main(["--env", "fast", *TINY, "--out-dir", str(tmp_path)])
    summary = read_json(tmp_path / "summary.json")
    cell = read_json(os.path.join(out, "cells", f"fast__{script.ALGO}.json"))
    assert summary["eval_return_per_seed"] == cell["eval_return_per_seed"]
    last = [float(r["train_return"]) for r in read_csv(tmp_path / "metrics.csv")][-2:]
    assert last == cell["curve"]["train_return"][-1]  # the last update's training return, per seed


def write_drift(path, clip_eps=0.2, temporal=False):
    args = lpo_meta.Args(env="inverted_pendulum", clip_eps=clip_eps, temporal=temporal)
    lpo_meta.save_drift(path, args, lpo_meta.init_drift_params(jax.random.PRNGKey(0), temporal), 0)


def test_a_rows_cells_differ_only_in_their_drift(tmp_path, monkeypatch):
    path = str(tmp_path / "drift.msgpack")
    write_drift(path, clip_eps=0.3)
    args = eval_transfer.Args(envs=["hopper", "fast"], algos=["ppo", "dpo", "lpo"], drift=path, num_envs=64,
                              hidden_sizes=(32, 32), clip_eps=0.1)  # fmt: skip
    cells, (_, drift_config) = eval_transfer.resolve_cells(args)
    for env in ("hopper", "fast"):
        ppo_args, dpo_args, lpo_args = (cells[env, algo] for algo in ("ppo", "dpo", "lpo"))
        assert (type(ppo_args), type(dpo_args), type(lpo_args)) == (ppo.Args, dpo.Args, lpo_meta.Args)
        for name in eval_transfer.SETTINGS:
            assert getattr(ppo_args, name) == getattr(dpo_args, name) == getattr(lpo_args, name), name
        assert ppo_args.num_envs == 64 and ppo_args.hidden_sizes == (32, 32) and ppo_args.gamma is not None
        assert ppo_args.clip_eps == 0.1 and lpo_args.clip_eps == 0.3 == drift_config["clip_eps"]
    # a script whose presets drifted apart from the others' would break the comparison: caught before training
    fast = dpo.PRESETS["fast"]
    monkeypatch.setitem(dpo.PRESETS, "fast", (*fast[:2], 96, *fast[3:]))  # num_steps
    with pytest.raises(SystemExit, match="fast: .* num_steps; give --num-steps"):
        eval_transfer.resolve_cells(args)
    # inverted_pendulum's cpu tier gives ppo.py an entropy bonus and a budget of its own: the row needs one value each
    pendulum = eval_transfer.Args(envs=["inverted_pendulum"], algos=["ppo", "dpo"], preset="cpu")
    with pytest.raises(SystemExit, match="differ in ent_coef, total_timesteps; give --ent-coef --total-timesteps"):
        eval_transfer.resolve_cells(pendulum)
    cells, _ = eval_transfer.resolve_cells(dataclasses.replace(pendulum, ent_coef=0.0, total_timesteps=10**6))
    assert cells["inverted_pendulum", "ppo"].ent_coef == cells["inverted_pendulum", "dpo"].ent_coef == 0.0


def test_the_harness_holds_no_algorithm_of_its_own():
    tree = ast.parse(open(eval_transfer.__file__).read())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for name in ("make_train", "make_networks", "make_env", "compute_gae", "make_evaluate", "ppo_drift", "dpo_drift",
                 "lpo_drift", "MLP", "KeepFinalObs", "PRESETS", "resolve_args"):  # fmt: skip
        assert name not in defined


def test_help_lists_the_shared_options_and_not_the_run_ones(capsys):
    with pytest.raises(SystemExit) as done:
        eval_transfer.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--envs", "--algos", "--drift", "--results-dir", "--total-timesteps", "--clip-eps", "--dpo-alpha"):
        assert flag in text
    for flag in ("--env ", "--out-dir", "--render", "--save-model", "--track"):
        assert flag not in text


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
    path = str(tmp_path / "drift.msgpack")
    args = lpo_meta.Args(env="fast", temporal=True)  # the file claims 16 features but holds an 8-feature network
    lpo_meta.save_drift(path, args, lpo_meta.init_drift_params(jax.random.PRNGKey(0), temporal=False), 0)
    with pytest.raises(SystemExit) as error:
        eval_transfer.main(["--envs", "fast", "--algos", "lpo", "--drift", path, "--results-dir", str(tmp_path / "o")])
    assert str(error.value).startswith("error: ") and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_a_drift_from_lpo_meta_loads_and_trains(tmp_path):
    meta_dir = str(tmp_path / "meta")
    lpo_meta.main(["--env", "fast", *TINY[2:], "--population-size", "2", "--generations", "1", "--out-dir", meta_dir])
    drift = os.path.join(meta_dir, "drift.msgpack")
    out = str(tmp_path / "transfer")
    eval_transfer.main(["--envs", "fast", "--algos", "lpo", "--drift", drift, "--results-dir", out, *TINY])
    cell = read_json(os.path.join(out, "cells", "fast__lpo.json"))
    assert np.all(np.isfinite(cell["eval_return_per_seed"])) and "drift_sha256" in cell["config"]
    with open(os.path.join(out, "results.md")) as f:
        assert "LPO drift: " in f.read()

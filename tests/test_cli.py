"""ppo.py and dpo.py from the command line, as a user runs them: outputs, determinism, bad input, NaN."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--env", "inverted_pendulum", "--total-timesteps", "4096", "--num-envs", "32", "--num-steps", "16",
        "--num-minibatches", "4", "--update-epochs", "2", "--hidden-sizes", "16", "16", "--num-eval-envs", "4",
        "--episode-length", "50", "--log-every", "2", "--num-seeds", "2", "--num-evals", "3"]  # fmt: skip
SUMMARY_KEYS = {"env", "algo", "env_steps", "eval_return_mean", "eval_return_per_seed", "train_return_mean",
                "compile_s", "run_s", "sps"}  # fmt: skip


def run(script, *args, cwd, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
    """dpo.py twice with the same seed; the second also saves, renders and logs to W&B (offline)."""
    tmp = tmp_path_factory.mktemp("dpo")
    first = run("dpo.py", *TINY, "--out-dir", "a", cwd=tmp)
    second = run("dpo.py", *TINY, "--out-dir", "b", "--save-model", "--render", "--track", cwd=tmp,
                 env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})  # fmt: skip
    for result in (first, second):
        assert result.returncode == 0, result.stderr[-3000:]
    return tmp, first, second


def test_run_writes_every_output(dpo_runs):
    tmp, first, second = dpo_runs
    for name in ("config.json", "metrics.csv", "summary.json", "returns.png"):
        assert os.path.getsize(tmp / "a" / name) > 0
    for name in ("params.msgpack", "replay.html"):
        assert os.path.getsize(tmp / "b" / name) > 0
    assert "<html" in (tmp / "b" / "replay.html").read_text().lower()
    # a real run's file loads: its config is the run's, and each seed's policy is its own
    (act_0, loaded_args), (act_1, _) = (dpo.load_policy(str(tmp / "b" / "params.msgpack"), i) for i in (0, 1))
    assert json.loads(json.dumps(dataclasses.asdict(loaded_args))) == json.loads(
        (tmp / "b" / "config.json").read_text()
    )
    obs = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    assert not np.array_equal(act_0(obs), act_1(obs))
    summary = json.loads((tmp / "a" / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["algo"] == "dpo" and summary["env"] == "inverted_pendulum" and summary["env_steps"] == 4096
    assert len(summary["eval_return_per_seed"]) == 2
    config = json.loads((tmp / "a" / "config.json").read_text())
    assert config["dpo_alpha"] == 2.0 and config["gamma"] is not None  # resolved, not None
    rows = list(csv.DictReader(open(tmp / "a" / "metrics.csv")))
    # every 2nd update is logged, and the 3 evaluations (8 updates: after updates 3, 6 and 8) are too
    assert [(r["seed"], r["update"]) for r in rows] == [(s, u) for u in "23468" for s in "01"]
    assert [r["update"] for r in rows if r["eval_return"]] == ["3", "3", "6", "6", "8", "8"]
    assert [float(r["eval_return"]) for r in rows[-2:]] == pytest.approx(summary["eval_return_per_seed"], rel=1e-6)
    last_line = first.stdout.strip().splitlines()[-1]
    assert last_line.startswith("dpo inverted_pendulum: eval return") and "steps/s" in last_line
    assert any(name.startswith("offline-run") for name in os.listdir(tmp / "b" / "wandb"))  # W&B files stay in the run


def test_same_seed_gives_identical_metrics(dpo_runs):
    tmp = dpo_runs[0]

    def strip_time(path):
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(open(path))]

    assert strip_time(tmp / "a" / "metrics.csv") == strip_time(tmp / "b" / "metrics.csv")
    summaries = [json.loads((tmp / d / "summary.json").read_text()) for d in ("a", "b")]
    assert summaries[0]["eval_return_per_seed"] == summaries[1]["eval_return_per_seed"]


@pytest.mark.parametrize("script", ["ppo.py", "dpo.py"])
def test_help(script, tmp_path):
    result = run(script, "--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("--env", "--total-timesteps", "--num-minibatches", "--save-model", "--render", "--track"):
        assert flag in result.stdout
    assert ("--clip-eps" if script == "ppo.py" else "--dpo-alpha") in result.stdout


@pytest.mark.parametrize(
    "bad_args, message",
    [
        (["--env", "antt"], "unknown env 'antt'; choose one of: ant, "),
        (["--env", "swimmer", "--backend", "spring"], "env 'swimmer' does not support backend 'spring'"),
        (["--backend", "physx"], "unknown backend 'physx'; choose one of: spring, positional, generalized, mjx"),
        (["--num-envs", "10", "--num-steps", "3", "--num-minibatches", "4"], "num_envs·num_steps = 10·3 = 30 is not"),
        (["--total-timesteps", "0"], "--total-timesteps must be positive, got 0"),
        (["--total-timesteps", "100", "--num-envs", "64", "--num-steps", "8"], "is less than one update"),
        (["--learning-rate", "-1"], "--learning-rate must be positive, got -1.0"),
        (
            ["--total-timesteps", "4096", "--num-envs", "64", "--num-steps", "16", "--num-evals", "5"],
            "--num-evals 5 is more than the 4 updates",
        ),
    ],
)
def test_bad_input_is_a_one_line_error_before_compiling(bad_args, message, tmp_path):
    result = run("ppo.py", "--env", "inverted_pendulum", *bad_args, "--out-dir", "out", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()  # stopped before writing (or compiling) anything


def test_a_run_that_goes_nan_stops_and_names_the_update(tmp_path):
    result = run("ppo.py", *TINY, "--learning-rate", "1e30", "--total-timesteps", "40960", "--out-dir", "o",
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged:") and "NaN/inf at update" in last, result.stderr[-2000:]
    # what was reached is kept: summary.json, marked diverged, names the same update as the error
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["diverged"] is True and summary["error"] == last.removeprefix("error: ")
    assert f"at update {summary['diverged_at_update']} ({summary['diverged_at_env_steps']} steps)" in last
    metrics = tmp_path / "o" / "metrics.csv"  # absent when the NaN came before the first logged update
    rows = list(csv.DictReader(open(metrics))) if metrics.exists() else []
    assert all(int(r["update"]) < summary["diverged_at_update"] for r in rows)
    assert summary["eval_return_per_seed"] == [float(r["eval_return"]) for r in rows if r["eval_return"]][-2:]

"""ppo.py and dpo.py as a user runs them, through main(argv) in-process and once through the real command line:
outputs, determinism, bad input, NaN."""

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import shlex
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import tyro

import dpo
import ppo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--env", "inverted_pendulum", "--total-timesteps", "4096", "--num-envs", "32", "--num-steps", "16",
        "--num-minibatches", "4", "--update-epochs", "2", "--hidden-sizes", "16", "16", "--num-eval-envs", "4",
        "--episode-length", "50", "--log-every", "2", "--num-seeds", "2", "--num-evals", "3"]  # fmt: skip
SUMMARY_KEYS = {"env", "algo", "env_steps", "eval_return_mean", "eval_return_per_seed", "train_return_mean",
                "compile_s", "run_s", "sps"}  # fmt: skip


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """dpo.py in-process, saving the policy and rendering a replay; returns its folder and printed lines."""
    out = tmp_path_factory.mktemp("dpo") / "a"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        dpo.main([*TINY, "--out-dir", str(out), "--save-model", "--render"])
    return out, printed.getvalue()


def test_run_writes_every_output(dpo_run):
    out, printed = dpo_run
    for name in ("config.json", "metrics.csv", "summary.json", "returns.png", "params.msgpack", "replay.html"):
        assert os.path.getsize(out / name) > 0
    assert "<html" in (out / "replay.html").read_text().lower()
    # a real run's file loads: its config is the run's, and each seed's policy is its own
    (act_0, loaded_args), (act_1, _) = (dpo.load_policy(str(out / "params.msgpack"), i) for i in (0, 1))
    assert json.loads(json.dumps(dataclasses.asdict(loaded_args))) == json.loads((out / "config.json").read_text())
    obs = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    assert not np.array_equal(act_0(obs), act_1(obs))
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["algo"] == "dpo" and summary["env"] == "inverted_pendulum" and summary["env_steps"] == 4096
    assert len(summary["eval_return_per_seed"]) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["dpo_alpha"] == 2.0 and config["gamma"] is not None  # resolved, not None
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    # every 2nd update is logged, and the 3 evaluations (8 updates: after updates 3, 6 and 8) are too
    assert [(r["seed"], r["update"]) for r in rows] == [(s, u) for u in "23468" for s in "01"]
    assert [r["update"] for r in rows if r["eval_return"]] == ["3", "3", "6", "6", "8", "8"]
    assert [float(r["eval_return"]) for r in rows[-2:]] == pytest.approx(summary["eval_return_per_seed"], rel=1e-6)
    last_line = printed.strip().splitlines()[-1]
    assert last_line.startswith("dpo inverted_pendulum: eval return") and "steps/s" in last_line


@pytest.mark.slow
def test_the_command_line_gives_the_same_run(dpo_run, tmp_path):
    """The real command line, logging to W&B offline: the same seed gives the in-process run's metrics."""
    out = dpo_run[0]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dpo.py"), *TINY, "--out-dir", "b", "--track"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("dpo inverted_pendulum: eval return")
    assert any(name.startswith("offline-run") for name in os.listdir(tmp_path / "b" / "wandb"))  # W&B stays in the run

    def strip_time(path):
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(open(path))]

    assert strip_time(out / "metrics.csv") == strip_time(tmp_path / "b" / "metrics.csv")
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, tmp_path / "b")]
    assert summaries[0]["eval_return_per_seed"] == summaries[1]["eval_return_per_seed"]


def test_a_replay_shows_every_physics_step(tmp_path, monkeypatch):
    """With action_repeat 2 a 50-step episode is 25 decisions, each held for 2 steps: 50 frames."""
    from brax.io import html

    frames = []
    monkeypatch.setattr(html, "render", lambda sys, states: frames.append(len(states)) or "<html></html>")
    args = ppo.resolve_args(ppo.Args(env="inverted_pendulum", hidden_sizes=(8,), num_envs=8, num_steps=8,
                                     num_minibatches=1, action_repeat=2, episode_length=50))  # fmt: skip
    init, _, _ = ppo.make_networks(args, 4, 1)
    params = jax.vmap(init)(jax.random.split(jax.random.PRNGKey(0), 1))
    stats = jax.tree.map(lambda x: x[None], ppo.init_obs_stats(4))
    ppo.write_replay(str(tmp_path / "replay.html"), args, params, stats, jax.random.PRNGKey(1))
    assert frames == [50]


def test_mujoco_warnings_reach_python_but_for_brax_halfcheetahs_own(capfd):
    from brax import envs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        envs.get_environment("halfcheetah", backend="spring")  # Brax's model sets MuJoCo's deprecated settotalmass
        ppo.mujoco_warning("another warning")
    assert [str(w.message) for w in caught if "MuJoCo" in str(w.message)] == ["MuJoCo: another warning"]
    assert "settotalmass" not in capfd.readouterr().err


@pytest.mark.parametrize("script", [ppo, dpo])
def test_help(script, capsys):
    with pytest.raises(SystemExit) as done:
        script.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--env", "--total-timesteps", "--num-minibatches", "--save-model", "--render", "--track"):
        assert flag in text
    assert ("--clip-eps" if script is ppo else "--dpo-alpha") in text


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
        (["--clip-eps", "0"], "--clip-eps must be positive, got 0.0"),
        (
            ["--total-timesteps", "4096", "--num-envs", "64", "--num-steps", "16", "--num-evals", "5"],
            "--num-evals 5 is more than the 4 updates",
        ),
    ],
)
def test_bad_input_is_a_one_line_error_before_compiling(bad_args, message, tmp_path):
    with pytest.raises(SystemExit) as error:
        ppo.main(["--env", "inverted_pendulum", *bad_args, "--out-dir", str(tmp_path / "out")])
    text = str(error.value)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not (tmp_path / "out").exists()  # stopped before writing (or compiling) anything


@pytest.mark.slow
def test_a_run_that_goes_nan_stops_and_names_the_update(tmp_path):
    with pytest.raises(SystemExit) as error:
        ppo.main([*TINY, "--learning-rate", "1e30", "--total-timesteps", "40960", "--out-dir", str(tmp_path / "o")])
    last = str(error.value)
    assert last.startswith("error: training diverged:") and "NaN/inf at update" in last and "\n" not in last
    # what was reached is kept: summary.json, marked diverged, names the same update as the error
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["diverged"] is True and summary["error"] == last.removeprefix("error: ")
    assert f"at update {summary['diverged_at_update']} ({summary['diverged_at_env_steps']} steps)" in last
    metrics = tmp_path / "o" / "metrics.csv"  # absent when the NaN came before the first logged update
    rows = list(csv.DictReader(open(metrics))) if metrics.exists() else []
    assert all(int(r["update"]) < summary["diverged_at_update"] for r in rows)
    assert summary["eval_return_per_seed"] == [float(r["eval_return"]) for r in rows if r["eval_return"]][-2:]


def test_on_a_terminal_progress_is_a_bar_and_metrics_csv_is_unchanged(tmp_path, monkeypatch):
    args = ppo.resolve_args(ppo.Args(env="inverted_pendulum", total_timesteps=4096, num_envs=32, num_steps=16,
                                     num_seeds=2, log_every=2))  # fmt: skip
    rows = {}
    for tty in (False, True):
        monkeypatch.setattr(sys.stdout, "isatty", lambda tty=tty: tty)
        logger, printed = ppo.Logger(args, str(tmp_path)), io.StringIO()
        assert (logger.bar is not None) == tty
        with contextlib.redirect_stdout(printed):
            for update in range(1, logger.num_updates + 1):
                metrics = dict(update=update, env_steps=update * 512, evaluated=update == 8, eval_return=np.ones(2),
                               train_return=np.full(2, update), loss=np.zeros(2), approx_kl=np.zeros(2),
                               episodes_finished=np.full(2, float(update >= 3)))  # fmt: skip
                logger(metrics)
            logger.close()
        rows[tty] = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in logger.rows]
        if tty:  # the bar reached the last step and no progress line was printed
            assert logger.bar.tasks[0].completed == logger.bar.tasks[0].total == 4096
            assert "update" not in printed.getvalue()
        else:
            assert printed.getvalue().startswith("update     1/8")
            lines = printed.getvalue().splitlines()  # no return before an episode has ended
            assert "| return       n/a |" in lines[0] and "| return       4.0 |" in printed.getvalue()
            assert "        0 steps/s" not in lines[0]  # the first line has a rate: the clock ran before update 1
    assert rows[True] == rows[False] and len(rows[True]) == 2 * 4  # every 2nd update, for 2 seeds


def readme_commands():
    """Every `python SCRIPT.py ...` line of README.md's shell blocks: continuation lines joined, comments dropped."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line, comments=True) for line in lines]
    return [argv[1:] for argv in commands if argv[:1] == ["python"] and argv[1].endswith(".py")]


def test_readme_commands_parse_and_pass_every_check(monkeypatch):
    """The README's commands are the first a user runs: each must still name real flags with allowed values."""
    import eval_transfer
    import lpo_meta

    monkeypatch.chdir(ROOT)  # paths in the README are relative to the repository
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"dpo.py", "lpo_meta.py", "eval_transfer.py"}
    for script, *argv in commands:
        if script in ("ppo.py", "dpo.py"):
            module = {"ppo.py": ppo, "dpo.py": dpo}[script]
            module.resolve_args(tyro.cli(module.Args, args=argv))
        elif script == "lpo_meta.py" and "--resume" not in argv:  # a resumed run needs its folder
            lpo_meta.check_lpo_args(lpo_meta.resolve_args(lpo_meta.parse_args(argv)[0]))
        elif script == "eval_transfer.py":
            eval_transfer.resolve_cells(tyro.cli(eval_transfer.Args, args=argv))

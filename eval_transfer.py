"""PPO vs DPO vs LPO across Brax environments, in one command: the comparison of "Discovered Policy Optimisation"
(Lu et al., NeurIPS 2022), with confidence intervals and figures.

A harness on the three scripts: every (env, algo) cell trains all its seeds vmapped in one compile with that
algorithm's own make_train (ppo.py's, dpo.py's, or lpo_meta.py's with the drift from --drift). Every cell of
a row gets the same settings (the env's preset, the options given here, the seeds) apart from the drift's own
fields; this is checked before anything trains. An LPO drift meta-learned on one env is applied unchanged to
every env listed, so the envs it never saw measure transfer.

    python eval_transfer.py --envs hopper walker2d halfcheetah ant --algos ppo dpo lpo \\
        --drift runs/<meta-run>/drift.msgpack --num-seeds 4

Each cell is saved to {results-dir}/cells/ as soon as it finishes, and re-running the same command skips
finished cells, so an interrupted evaluation resumes. Outputs in --results-dir: results.csv and
results.json (env, algo, seed, eval_return), results.md (mean final return per cell with a 95% bootstrap
interval and the ratio to PPO, wall times, the CPU model), curves.png (per env and algo the deterministic
evaluations if --num-evals ≥ 2, else the training return) and drifts.png (∂(r·Â − D)/∂r over (r, Â) for PPO,
DPO and the LPO drift).
"""

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import platform
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from matplotlib.figure import Figure

import dpo
import lpo_meta
import ppo

ALGOS = {"ppo": ppo, "dpo": dpo, "lpo": lpo_meta}  # each algo's own script
DRIFT_FIELDS = {"ppo": ("clip_eps",), "dpo": ("dpo_alpha", "dpo_beta"), "lpo": ("clip_eps", "ppo_init", "temporal")}


@dataclasses.dataclass
class Args(ppo.Args):
    """ppo.py's options, given to every cell alike (the env presets fill those left unset), plus these."""

    envs: list[str] = dataclasses.field(default_factory=lambda: ["hopper", "walker2d", "halfcheetah", "ant"])
    """Brax environments; each uses its own preset for the fields left at None."""
    algos: list[str] = dataclasses.field(default_factory=lambda: ["ppo", "dpo"])
    """Algorithms to compare: ppo, dpo, lpo (lpo needs --drift)."""
    drift: str | None = None
    """LPO drift written by lpo_meta.py (drift.msgpack); its ppo_init, temporal and clip_eps come with it."""
    results_dir: str = "runs/transfer"
    """Output folder: cells/ (one result file per env and algo), results.*, curves.png, drifts.png."""
    num_bootstrap: int = 10_000
    """Bootstrap resamples for the 95% confidence intervals of results.md."""
    dpo_alpha: float = 2.0
    """DPO's α: for Â ≥ 0 the objective is capped smoothly at Â + α."""
    dpo_beta: float = 0.6
    """DPO's β: for Â < 0 it sets how far below r = 1 the rollback begins."""
    # ppo.py's options that are not options here: a cell's env comes from --envs, and cells are not saved as runs
    env: tyro.conf.Suppress[str] = "ant"
    out_dir: tyro.conf.Suppress[str | None] = None
    track: tyro.conf.Suppress[bool] = False
    wandb_project: tyro.conf.Suppress[str] = "discovered-policy-optimisation"
    wandb_entity: tyro.conf.Suppress[str | None] = None
    save_model: tyro.conf.Suppress[bool] = False
    render: tyro.conf.Suppress[bool] = False


# ---------------------------------------------------------------------------------------------------
# Cells: one (env, algo) pair, all seeds; saved when finished, skipped when already saved with the same config.


def check_drift_file(path):
    """(params, config) of an LPO drift file; a one-line SystemExit if it is missing, malformed or mis-shaped."""
    params, config = lpo_meta.load_drift(path)
    missing = [k for k in ("env", "ppo_init", "clip_eps", "temporal") if k not in config]
    if missing:
        raise SystemExit(f"error: {path}: the drift's config lacks {', '.join(missing)} (not lpo_meta.py's?)")
    return params, config


def field_names(algo):
    return {f.name for f in dataclasses.fields(ALGOS[algo].Args)}


# What a cell trains with apart from its drift: the fields every script's Args has (the drift's own excepted).
SETTINGS = sorted(set.intersection(*(field_names(algo) for algo in ALGOS)) - {"clip_eps", "out_dir"})


def cell_args(args, env, algo, drift_config):
    """The resolved Args of algo's own script for one cell: the options given here, the env's preset for the rest,
    and for LPO the drift's fields as it was meta-trained."""
    given = {k: v for k, v in dataclasses.asdict(args).items() if k in field_names(algo)}
    if algo == "lpo":
        given.update({k: drift_config[k] for k in DRIFT_FIELDS["lpo"]})
    module = ALGOS[algo]
    return module.resolve_args(module.Args(**{**given, "env": env}))


def resolve_cells(args):
    """Every check, before anything is compiled. Returns ({(env, algo): that cell's resolved Args}, the LPO drift
    as (params, config) or None)."""
    envs_, algos = list(dict.fromkeys(args.envs)), list(dict.fromkeys(args.algos))  # in order, once each
    if not envs_ or not algos:
        raise SystemExit("error: --envs and --algos need at least one name each")
    unknown = [a for a in algos if a not in ALGOS]
    if unknown:
        raise SystemExit(f"error: unknown algo {unknown[0]!r}; choose among: {', '.join(ALGOS)}")
    if "lpo" in algos and args.drift is None:
        raise SystemExit("error: --algos lpo needs --drift (the drift.msgpack written by lpo_meta.py)")
    drift = check_drift_file(args.drift) if args.drift is not None else None
    cells = {(env, algo): cell_args(args, env, algo, drift and drift[1]) for env in envs_ for algo in algos}
    for env in envs_:  # the comparison's premise: within a row only the drift differs
        row = {algo: {k: getattr(cells[env, algo], k) for k in SETTINGS} for algo in algos}
        differ = sorted(k for k in SETTINGS if len({repr(s[k]) for s in row.values()}) > 1)
        if differ:  # a preset that sets a field per algorithm: the comparison needs one value, given by the user
            flags = " ".join(f"--{k.replace('_', '-')}" for k in differ)
            raise SystemExit(f"error: {env}: the algorithms' presets differ in {', '.join(differ)}; give {flags} here")
    return cells, drift


def cell_config(args, algo, cell):
    """What determines a cell's result; its hash is the fingerprint that decides whether a saved cell is reused."""
    config = {k: getattr(cell, k) for k in (*SETTINGS, *DRIFT_FIELDS[algo])}
    config.update(algo=algo, num_seeds=args.num_seeds)
    if algo == "lpo":
        with open(args.drift, "rb") as f:
            config["drift_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return json.loads(json.dumps(config))  # as it reads back from a saved cell (tuples become lists)


def fingerprint(config):
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def read_cell(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class CellLogger(ppo.Logger):
    """ppo.py's Logger (live lines, metrics.csv, NaN guard) that also keeps every update's training return and
    every evaluation's return, per seed."""

    def __init__(self, args, csv_path):
        super().__init__(args, os.path.dirname(csv_path))
        self.csv_path, self.curve, self.evals = csv_path, [], []

    def __call__(self, metrics):
        steps = int(metrics["env_steps"])
        self.curve.append((steps, np.asarray(metrics["train_return"]).tolist()))
        if metrics["evaluated"]:
            self.evals.append((steps, np.asarray(metrics["eval_return"]).tolist()))
        super().__call__(metrics)


def cpu_model():
    """The processor's model name (XLA's CPU kernels, and so a run's exact numbers, differ between models)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    return platform.processor() or platform.machine()


def run_cell(args, algo, cell, path, drift_params=None):
    """Trains one cell with its algorithm's make_train (all seeds vmapped, one compile, as that script's main
    compiles it) and saves its result atomically to path."""
    module, name = ALGOS[algo], f"{cell.env}/{algo}"
    logger = CellLogger(dataclasses.replace(args, **{k: getattr(cell, k) for k in SETTINGS}),
                        path.removesuffix(".json") + ".metrics.csv")  # fmt: skip
    train = module.make_train(cell, drift_params, log_fn=logger) if algo == "lpo" else module.make_train(cell, logger)
    train = jax.jit(train, compiler_options=module.compiler_options())
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(args.seed, args.seed + args.num_seeds))
    start = time.perf_counter()
    compiled = train.lower(keys).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    logger.begin()
    try:
        _, eval_returns = jax.block_until_ready(compiled(keys))
    except Exception:
        if logger.error:
            raise SystemExit(f"error: {name}: {logger.error}") from None
        raise
    run_s = time.perf_counter() - start
    eval_per_seed = np.asarray(eval_returns).mean(axis=1)
    if not np.all(np.isfinite(eval_per_seed)):
        raise SystemExit(f"error: {name}: final evaluation returned NaN/inf: {eval_per_seed.tolist()}")
    per_update = cell.num_envs * cell.num_steps * cell.action_repeat
    curve, evals = sorted(logger.curve), sorted(logger.evals)
    config = cell_config(args, algo, cell)
    result = dict(
        env=cell.env,
        algo=algo,
        fingerprint=fingerprint(config),
        seeds=list(range(args.seed, args.seed + args.num_seeds)),
        eval_return_per_seed=eval_per_seed.tolist(),
        eval_return_mean=float(eval_per_seed.mean()),
        env_steps=cell.total_timesteps // per_update * per_update,
        compile_s=round(compile_s, 2),
        run_s=round(run_s, 2),
        curve=dict(
            env_steps=[s for s, _ in curve],
            train_return=[r for _, r in curve],
            eval_env_steps=[s for s, _ in evals],
            eval_return=[r for _, r in evals],
        ),
        machine=f"{cpu_model()}, {jax.device_count()} {jax.default_backend()} device(s)",
        config=config,
    )
    ppo.atomic_write(path, json.dumps(result, indent=1).encode())
    return result


# ---------------------------------------------------------------------------------------------------
# Statistics, table and figures.


def bootstrap_ci(values, num_resamples=10_000, confidence=0.95, seed=0):
    """Percentile bootstrap interval of the mean: the seeds resampled with replacement num_resamples times,
    from a fixed numpy Generator seed (the same data always gives the same interval)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(num_resamples, len(values)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def write_tables(args, envs_, algos, results, drift_config):
    """results.csv and results.json (one row per env, algo and seed), results.md (one entry per cell)."""
    rows = [
        dict(env=env, algo=algo, seed=seed, eval_return=value)
        for env in envs_
        for algo in algos
        for seed, value in zip(results[env, algo]["seeds"], results[env, algo]["eval_return_per_seed"], strict=True)
    ]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    ppo.atomic_write(os.path.join(args.results_dir, "results.csv"), text.getvalue().encode())
    ppo.atomic_write(os.path.join(args.results_dir, "results.json"), json.dumps(rows, indent=1).encode())

    means = {key: float(np.mean(r["eval_return_per_seed"])) for key, r in results.items()}
    lines = ["# Final evaluation return: " + " vs ".join(a.upper() for a in algos), "",
             "| env | env steps | " + " | ".join(algos) + " |", "|:---|---:|" + "---:|" * len(algos)]  # fmt: skip
    for env in envs_:
        best = max(means[env, algo] for algo in algos)
        entries = []
        for algo in algos:
            low, high = bootstrap_ci(results[env, algo]["eval_return_per_seed"], args.num_bootstrap)
            mean = f"{means[env, algo]:.1f}"
            entry = (f"**{mean}**" if means[env, algo] == best else mean) + f" [{low:.1f}, {high:.1f}]"
            if "ppo" in algos and algo != "ppo" and means[env, "ppo"] > 0:
                entry += f" ×{means[env, algo] / means[env, 'ppo']:.2f}"
            entries.append(entry)
        lines.append(f"| {env} | {results[env, algos[0]]['env_steps']:,} | " + " | ".join(entries) + " |")
    seeds = results[envs_[0], algos[0]]["seeds"]
    lines += [
        "",
        f"Each entry: the mean over {len(seeds)} seed(s) ({seeds[0]}–{seeds[-1]}) of the final evaluation return "
        f"(deterministic policy, mean of {args.num_eval_envs} episodes of up to {args.episode_length} steps), "
        f"[its 95% percentile-bootstrap interval over seeds, {args.num_bootstrap:,} resamples], and ×: the ratio "
        "of the mean to PPO's (shown when PPO's mean is positive). Bold: the best mean of the row. In a row every "
        "algorithm ran with the same settings, budget and seeds; only the drift differs.",
    ]
    if drift_config is not None:
        lines += ["", f"LPO drift: `{args.drift}`, meta-trained on {drift_config['env']} "
                  f"(ppo_init={drift_config['ppo_init']}, temporal={drift_config['temporal']}); "
                  "on every other env it is applied without having seen it (transfer)."]  # fmt: skip
    lines += ["", "Settings per env (the same for every algorithm):", ""]
    for env in envs_:
        c = results[env, algos[0]]["config"]
        eps = f"; PPO's drift: clipping range {results[env, 'ppo']['config']['clip_eps']}" if "ppo" in algos else ""
        lines.append(f"- {env}: {c['num_envs']} envs × {c['num_steps']} steps per update, "
                     f"{results[env, algos[0]]['env_steps'] // (c['num_envs'] * c['num_steps'] * c['action_repeat'])} "
                     f"updates of {c['update_epochs']} epochs × {c['num_minibatches']} minibatches, hidden "
                     f"{tuple(c['hidden_sizes'])}, lr {c['learning_rate']}, γ {c['gamma']}, reward scaling "
                     f"{c['reward_scaling']}, {c['backend']} backend{eps}")  # fmt: skip
    lines += ["", "Wall time per cell, compile + training and evaluation (s):", "",
              "| env | " + " | ".join(algos) + " |", "|:---|" + "---:|" * len(algos)]  # fmt: skip
    for env in envs_:
        times = [f"{results[env, a]['compile_s']:.0f} + {results[env, a]['run_s']:.0f}" for a in algos]
        lines.append(f"| {env} | " + " | ".join(times) + " |")
    machines = sorted({r.get("machine", "not recorded") for r in results.values()})
    lines += [
        "",
        "Machine: " + "; ".join(machines) + (" (cells ran on different machines)" if len(machines) > 1 else ""),
    ]
    ppo.atomic_write(os.path.join(args.results_dir, "results.md"), ("\n".join(lines) + "\n").encode())


def plot_curves(path, envs_, algos, results):
    ncols = min(len(envs_), 3)
    nrows = math.ceil(len(envs_) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.6 * nrows), layout="tight")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    # the deterministic evaluations when there are several: training episodes that last 1,000 steps report late
    evaluated = all(len(results[env, algo]["curve"].get("eval_env_steps", [])) > 1 for env in envs_ for algo in algos)
    steps, returns = ("eval_env_steps", "eval_return") if evaluated else ("env_steps", "train_return")
    for ax, env in zip(axes.flat, envs_, strict=False):
        for algo in algos:
            curve = results[env, algo]["curve"]
            values = np.array(curve[returns])  # points × seeds
            line = ax.plot(curve[steps], values.mean(1), "o-" if evaluated else "-", label=algo.upper())[0]
            ax.fill_between(curve[steps], values.min(1), values.max(1), color=line.get_color(), alpha=0.2)
        ax.set(title=env, xlabel="environment steps",
               ylabel="evaluation return (mean action)" if evaluated else "training episode return")  # fmt: skip
        ax.legend(loc="best", fontsize="small")
    for ax in axes.flat[len(envs_) :]:
        ax.axis("off")
    fig.suptitle("mean over seeds (line) and min–max (band)", fontsize="small")
    lpo_meta.save_figure(fig, path)


def plot_drifts(path, args, cells, lpo=None):
    """Heat maps of ∂(r·Â − D)/∂r over (r, Â), on lpo_meta.py's grid: where the objective still pushes the ratio
    up (red) or down (blue). One PPO panel per clipping range its cells used."""
    eps = sorted({c.clip_eps for (_, algo), c in cells.items() if algo == "ppo"}) or [ppo.PAPER_COMMON["clip_eps"]]
    panels = [(f"PPO (ε = {e})", lambda r, a, e=e: ppo.ppo_drift(r, a, e)) for e in eps]
    panels.append((f"DPO (α = {args.dpo_alpha}, β = {args.dpo_beta})",
                   lambda r, a: dpo.dpo_drift(r, a, args.dpo_alpha, args.dpo_beta)))  # fmt: skip
    if lpo is not None:
        params, config = lpo
        for progress in (0.0, 1.0) if config["temporal"] else (0.0,):
            title = f"LPO ({config['env']})" + (f", n/N = {progress:g}" if config["temporal"] else "")
            panels.append((title, lambda r, a, p=progress: lpo_meta.lpo_drift(
                params, r, a, p, config["ppo_init"], config["clip_eps"], config["temporal"])))  # fmt: skip
    vmax = float(lpo_meta.HEAT_MAP_A.max())  # the slope without drift is Â; steeper rollback saturates the colours
    fig = Figure(figsize=(4 * len(panels) + 1, 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, drift_fn) in zip(axes, panels, strict=True):
        _, slope = lpo_meta.drift_maps(drift_fn)
        image = lpo_meta.heat_map(ax, slope, title, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    fig.colorbar(image, ax=list(axes), label="∂(r·Â − D)/∂r", extend="both")
    lpo_meta.save_figure(fig, path)


def main(argv=None):
    warnings.filterwarnings("ignore", message="Brax System, piplines and environments are not actively")
    args = tyro.cli(Args, description=__doc__, args=argv)
    cells, lpo = resolve_cells(args)
    envs_, algos = list(dict.fromkeys(env for env, _ in cells)), list(dict.fromkeys(algo for _, algo in cells))
    os.makedirs(os.path.join(args.results_dir, "cells"), exist_ok=True)
    logging.getLogger("jax._src.debugging").setLevel(logging.CRITICAL)  # the NaN guard reports itself

    results = {}
    for number, ((env, algo), cell) in enumerate(cells.items(), 1):
        path, name = (
            os.path.join(args.results_dir, "cells", f"{env}__{algo}.json"),
            f"[{number}/{len(cells)}] {env}/{algo}",
        )
        saved = read_cell(path)
        if saved is not None and saved["fingerprint"] == fingerprint(cell_config(args, algo, cell)):
            print(f"{name}: already done, eval return {saved['eval_return_mean']:.1f} ({path})", flush=True)
            results[env, algo] = saved
            continue
        if saved is not None:
            print(f"{name}: the saved cell was run with other settings; recomputing it", flush=True)
        print(f"{name}: {args.num_seeds} seed(s), {cell.total_timesteps:,} steps, {cell.num_envs} envs × "
              f"{cell.num_steps} steps per update", flush=True)  # fmt: skip
        result = results[env, algo] = run_cell(args, algo, cell, path, lpo and lpo[0])
        print(f"{name}: eval return {result['eval_return_mean']:.1f} | compile {result['compile_s']:.1f} s, "
              f"run {result['run_s']:.1f} s", flush=True)  # fmt: skip

    write_tables(args, envs_, algos, results, lpo[1] if lpo else None)
    plot_curves(os.path.join(args.results_dir, "curves.png"), envs_, algos, results)
    plot_drifts(os.path.join(args.results_dir, "drifts.png"), args, cells, lpo)
    print(open(os.path.join(args.results_dir, "results.md")).read(), flush=True)
    print(f"results in {args.results_dir}: results.md, results.csv, results.json, curves.png, drifts.png")


if __name__ == "__main__":
    main()

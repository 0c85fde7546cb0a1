"""The minibatch shuffle: jax.random.permutation against the scripts' `shuffled_indices`, per rollout size.

    python bench/shuffle.py --sizes 8192 163840 491520

Every update of ppo.py shuffles its rollout once per epoch. jax.random.permutation sorts key-value pairs
(twice, to make ties vanishingly rare), which XLA's CPU sort does far slower than one uint32 array;
`shuffled_indices` packs each index into the low bits of a random key and sorts that single array. Both
are jitted and timed alone, the median of `--repeats` calls; the table gives ms per shuffle.
"""

import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402


@dataclasses.dataclass
class Bench:
    sizes: tuple[int, ...] = (8192, 163_840, 491_520)
    """Rollout sizes (num_envs × num_steps): the CPU settings' 512 × 16, the presets' 2048 × 80 and 2048 × 240."""
    repeats: int = 20
    """Timed calls per shuffle and size; the table reports the median."""
    out: str = "bench/shuffle.json"
    """Where to write the table as JSON."""


def median_ms(fn, key, repeats):
    jax.block_until_ready(fn(key))  # compile
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(jax.random.fold_in(key, i)))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    bench = tyro.cli(Bench, description=__doc__)
    key = jax.random.PRNGKey(0)
    rows = []
    for n in bench.sizes:
        exact = median_ms(jax.jit(lambda k, n=n: jax.random.permutation(k, n)), key, bench.repeats)
        packed = median_ms(jax.jit(lambda k, n=n: ppo.shuffled_indices(k, n)), key, bench.repeats)
        rows.append(dict(size=n, permutation_ms=exact, shuffled_indices_ms=packed, speedup=exact / packed))
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}"
    print(f"\nms per shuffle, median of {bench.repeats}; {machine}\n")
    print("| samples | jax.random.permutation | shuffled_indices | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']:,} | {r['permutation_ms']:.1f} | {r['shuffled_indices_ms']:.1f} | {r['speedup']:.1f}× |")
    with open(bench.out + ".tmp", "w") as f:
        json.dump(dict(repeats=bench.repeats, rows=rows), f, indent=2)
    os.replace(bench.out + ".tmp", bench.out)


if __name__ == "__main__":
    main()

"""Data-parallel SVI throughput with 1 and 2 processes, and the cost of checkpoints.

GaussianMixture (K = 3, D = 2, full covariances, enumerated assignments) fitted by SVI on
synthetic data, full batch and minibatches. Throughput is data points per second of the
optimisation loop: the difference of two fits of different lengths, so that set-up and the
posterior draws afterwards cancel out. Two processes run under ``torchrun`` with gloo (CPU).

Checkpoint overhead: the time to build and write one checkpoint (safetensors + SHA-256 + fsync +
renames), measured by fitting with a checkpoint after every step against none, as a share of
the step time times the default interval (``checkpoint_every=500``).

    python benchmarks/distributed.py            # N = 20,000
    python benchmarks/distributed.py --smoke    # seconds
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import latentkit as lk
from latentkit.datasets import make_gaussian_mixture
from latentkit.inference.svi import SVIEngine, SVIOptions

LOCS = [[-3.0, 0.0], [0.0, 2.5], [3.0, 0.0]]
SCALES = [[1.0, 0.7], [0.8, 1.2], [1.1, 0.6]]


def _data(n: int):
    import numpy as np

    X, _ = make_gaussian_mixture(n, np.array(LOCS), np.array(SCALES), seed=0)
    return X


def _fit_seconds(X, steps: int, batch_size: int | None, distributed: bool, **options) -> float:
    start = time.perf_counter()
    lk.fit(lk.models.GaussianMixture(3), X, engine="svi", steps=steps, batch_size=batch_size, num_samples=5,
           learning_rate=0.05, progress=False, seed=0, distributed=distributed, **options)
    return time.perf_counter() - start


def loop_throughput(X, short: int, long: int, batch_size: int | None, distributed: bool) -> float:
    """Points per second of the optimisation loop (global batch per step / time per step)."""
    _fit_seconds(X, 2, batch_size, distributed)  # warm caches
    per_step = (_fit_seconds(X, long, batch_size, distributed) - _fit_seconds(X, short, batch_size, distributed))
    per_step /= long - short
    return (batch_size or len(X)) / per_step


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: print the throughputs as JSON on rank 0."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    X = _data(args.n)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    out = {str(b): loop_throughput(X, args.short, args.long, b, distributed) for b in (None, args.batch_size)}
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(out), flush=True)


def checkpoint_overhead(X, steps: int) -> tuple[float, float]:
    """(seconds per step, seconds per checkpoint), medians of three pairs of fits: the engine
    with a run folder and a checkpoint after every step, and without (no result is saved)."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    options = {"steps": steps, "num_samples": 5, "learning_rate": 0.05}
    plain, every = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(3):
            for run_dir, times in ((None, plain), (os.path.join(tmp, str(repeat)), every)):
                start = time.perf_counter()
                SVIEngine(checkpoint_every=1, **options).fit(lk.models.GaussianMixture(3), X, seed=0, progress=False,
                                                             run_dir=run_dir)
                times.append(time.perf_counter() - start)
    step = statistics.median(plain) / steps
    per_checkpoint = (statistics.median(every) - statistics.median(plain)) / steps
    return step, per_checkpoint


def main(args: argparse.Namespace) -> None:
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--worker", "--points", str(args.n), "--short-steps", str(args.short), "--long-steps", str(args.long),
             "--batch-size", str(args.batch_size)]
    results = {}
    for processes in (1, 2):
        launcher = ([sys.executable] if processes == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"])
        done = subprocess.run(launcher + [__file__] + flags, env=env, capture_output=True, text=True, check=False)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{processes}-process run failed:\n{done.stderr[-3000:]}")
        results[processes] = json.loads(line[len("RESULT "):])
    print(f"GMM SVI (K=3, D=2, full covariance), N = {args.n}, CPU float64, gloo; machine: {os.cpu_count()} cores")
    print(f"{'batch':>14} {'1 process (points/s)':>22} {'2 processes (points/s)':>24} {'speed-up':>9}")
    for key in results[1]:
        label = "full" if key == "None" else f"minibatch {key}"
        one, two = results[1][key], results[2][key]
        print(f"{label:>14} {one:>22,.0f} {two:>24,.0f} {two / one:>8.2f}x")

    X = _data(args.n_checkpoint)
    step, per_checkpoint = checkpoint_overhead(X, args.checkpoint_steps)
    every = SVIOptions().checkpoint_every
    print(f"\ncheckpoint (N = {args.n_checkpoint}, full batch): step {1e3 * step:.2f} ms, checkpoint "
          f"{1e3 * per_checkpoint:.2f} ms; at the default interval of {every} steps: "
          f"{100 * per_checkpoint / (every * step):.2f}% of step time (target < 2%)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--points", dest="n", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--short-steps", dest="short", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--long-steps", dest="long", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    defaults = {"n": 2000, "short": 5, "long": 25, "batch_size": 500} if arguments.smoke else \
        {"n": 20_000, "short": 20, "long": 120, "batch_size": 2000}
    for name, value in defaults.items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, value)
    arguments.n_checkpoint = 1000 if arguments.smoke else 2000
    arguments.checkpoint_steps = 20 if arguments.smoke else 100
    main(arguments)

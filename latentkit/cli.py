"""The ``latentkit`` command: demo, fit, diagnose, sample.

Exit codes: 0 success, 1 a fit or a check failed, 2 bad arguments or data, 130 / 143 a fit
stopped by SIGINT / SIGTERM after saving its state (``fit --resume DIR`` continues an SVI run).
Engine flags are generated from the engines' option dataclasses, so the command and the
Python API cannot drift apart.
"""

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latentkit.errors import ConfigError, DataError, InferenceError, LatentkitError

__all__ = ["main"]

MODELS = {"gmm": "GaussianMixture", "hmm": "GaussianHMM", "poisson-hmm": "PoissonHMM",
          "categorical-hmm": "CategoricalHMM"}


def _flag_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if isinstance(annotation, types.UnionType) and args else annotation
    if base is bool:
        return "bool"
    return base if base in (int, float) else str


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    from latentkit.inference.mcmc import MCMCOptions
    from latentkit.inference.svi import SVIOptions

    group = parser.add_argument_group("engine options (each engine accepts its own)")
    seen: set[str] = set()
    for engines, cls in (("svi", SVIOptions), ("nuts/hmc", MCMCOptions)):
        for f in dataclasses.fields(cls):
            if f.name in seen or f.name in ("device", "distributed"):
                continue
            seen.add(f.name)
            flag = "--" + f.name.replace("_", "-")
            kind = _flag_type(f.type)
            help_text = f"[{engines}] {f.metadata.get('help', '')} (default: {f.default})"
            if kind == "bool" and f.metadata.get("choices"):
                # A switch that also names a variant: --jit, --jit inductor, --no-jit.
                group.add_argument(flag, nargs="?", const=True, default=None, choices=f.metadata["choices"],
                                   help=help_text)
                group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                   default=None, help=argparse.SUPPRESS)
            elif kind == "bool":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                group.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=help_text)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    from latentkit.inference.mcmc import MCMCOptions
    from latentkit.inference.svi import SVIOptions

    names = {f.name for cls in (SVIOptions, MCMCOptions) for f in dataclasses.fields(cls)} - {"distributed"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _read_table(path: str, columns: str | None) -> pd.DataFrame:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--data: no such file {path!r}; pass a CSV or Parquet file.")
    try:
        frame = pd.read_parquet(file) if file.suffix in (".parquet", ".pq") else pd.read_csv(file)
    except (ValueError, OSError, ImportError) as error:
        raise DataError(f"--data: could not read {path!r} ({error}); pass a CSV or Parquet file.") from error
    if columns:
        wanted = [c.strip() for c in columns.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in frame.columns]
        if unknown:
            raise DataError(f"--columns: {unknown} not in {path!r}; its columns are {list(frame.columns)}.")
        frame = frame[wanted]
    return frame


def _print_fit(result: Any, out: Path, var_names: list[str] | None = None) -> None:
    from latentkit.diagnostics import check

    with pd.option_context("display.width", 120, "display.max_columns", 12):
        print(result.summary(var_names).round(3).to_string())
    print()
    print(check(result))
    print(f"\nrun folder: {out}")


def _build_model(args: argparse.Namespace) -> Any:
    """The built-in model named by MODEL, from the command's model flags."""
    import latentkit as lk

    if args.model == "gmm":
        return lk.models.GaussianMixture(n_components=args.components, covariance=args.covariance)
    hmm = {"sequence_column": args.sequence_column}
    if args.model == "hmm":
        return lk.models.GaussianHMM(n_states=args.states, covariance=args.covariance, **hmm)
    if args.model == "poisson-hmm":
        return lk.models.PoissonHMM(n_states=args.states, **hmm)
    if args.symbols is None:
        raise ConfigError("--symbols: categorical-hmm needs the number of symbols M (values 0..M-1).")
    return lk.models.CategoricalHMM(n_states=args.states, n_symbols=args.symbols, **hmm)


def _fit_model(data: Any, args: argparse.Namespace, engine: str, options: dict[str, Any], out: Path,
               resume: str | None = None, distributed: bool = False) -> Any:
    import latentkit as lk

    return lk.fit(_build_model(args), data, engine=engine, seed=args.seed, progress=not args.no_progress,
                  out=None if resume else out, resume=resume, distributed=distributed, **options)


def cmd_demo(args: argparse.Namespace) -> int:
    import latentkit as lk

    data = lk.datasets.load_old_faithful()
    print(f"Old Faithful geyser eruptions: {data.shape[0]} eruptions x {list(data.columns)}")
    print("Model: 2-component Gaussian mixture with full covariances.\n")
    steps, draws = (200, 100) if args.smoke else (2000, 1000)
    args.model, args.components, args.covariance = "gmm", 2, "full"
    runs = [("svi", {"steps": steps, "learning_rate": 0.05, "num_samples": draws}),
            ("nuts", {"num_samples": draws, "num_warmup": draws, "num_chains": 4})]
    for engine, options in runs:
        out = Path(args.out) / engine
        print(f"== {engine} ==")
        result = _fit_model(data, args, engine, options, out)
        _print_fit(result, out, ["weights", "locs", "scales"])
        print()
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    if args.model not in MODELS:
        raise ConfigError(f"MODEL: unknown model {args.model!r}; choose one of {sorted(MODELS)}.")
    from latentkit.distributed import launched_by_torchrun, rank

    data = _read_table(args.data, args.columns)
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ConfigError(f"--out: --resume continues in its own folder {args.resume!r}; drop --out.")
    out = Path(args.resume or args.out or "runs/fit")
    distributed = args.distributed or launched_by_torchrun()
    options = _engine_options(args)
    if "validation" in options:  # a held-out file read like --data
        options["validation"] = _read_table(options["validation"], args.columns)
    result = _fit_model(data, args, args.engine, options, out, args.resume, distributed)
    if rank() == 0:
        _print_fit(result, out)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    import latentkit as lk
    from latentkit.diagnostics import check
    from latentkit.diagnostics.plots import write_plots

    result = lk.load(args.dir)
    with pd.option_context("display.width", 120, "display.max_columns", 12):
        print(result.summary().round(3).to_string())
    report = check(result)
    print()
    print(report)
    written = write_plots(result, Path(args.dir) / "plots")
    print("\nplots: " + ", ".join(str(p) for p in written))
    if args.html:
        from latentkit.diagnostics import write_report

        print(f"report: {write_report(result, Path(args.dir) / 'report.html', images=written)}")
    return 0 if report.passed else 1


def cmd_sample(args: argparse.Namespace) -> int:
    import latentkit as lk

    result = lk.load(args.dir)
    if result.model is None or not hasattr(result.model, "sample"):
        raise ConfigError(f"DIR: the run in {args.dir!r} has no built-in model that can sample.")
    draws = result.model.sample(args.n, result=result, seed=args.seed)
    draws = np.asarray(draws).reshape(args.n, -1)  # one column per feature, also for 1-D models
    columns = result.coords.get("feature") or [f"x{i}" for i in range(draws.shape[1])]
    frame = pd.DataFrame(draws, columns=columns)
    if args.out:
        frame.to_csv(args.out, index=False)
        print(f"wrote {args.n} draws to {args.out}")
    else:
        frame.to_csv(sys.stdout, index=False)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"latentkit: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="latentkit", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    demo = verbs.add_parser("demo", help="fit a Gaussian mixture to Old Faithful with SVI and NUTS",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--out", default="runs/demo", help="parent folder of the two run folders")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--smoke", action="store_true", help="a seconds-long run")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=cmd_demo)

    fit = verbs.add_parser("fit", help="fit a model to a CSV or Parquet file",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fit.add_argument("model", metavar="MODEL", help=f"one of {sorted(MODELS)}")
    fit.add_argument("--data", required=True, help="CSV or Parquet file, one row per observation")
    fit.add_argument("--columns", default=None, help="comma-separated columns to use (default: all)")
    fit.add_argument("--components", type=int, default=2, help="gmm: number of components")
    fit.add_argument("--covariance", choices=("full", "diag"), default="full", help="gmm, hmm: covariance")
    fit.add_argument("--states", type=int, default=2, help="hmm, poisson-hmm, categorical-hmm: hidden states")
    fit.add_argument("--symbols", type=int, default=None, help="categorical-hmm: number of symbols")
    fit.add_argument("--sequence-column", default=None,
                     help="hmm models: column of sequence ids in long-format data (default: one sequence)")
    fit.add_argument("--engine", default="nuts", help="nuts, hmc or svi")
    fit.add_argument("--out", default=None, help="run folder to write (default: runs/fit)")
    fit.add_argument("--resume", default=None, metavar="DIR",
                     help="continue the interrupted svi run in DIR (repeat the original command's options)")
    fit.add_argument("--distributed", action="store_true",
                     help="data-parallel svi / chains spread across processes; automatic under torchrun")
    fit.add_argument("--seed", type=int, default=0, help="random seed")
    fit.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_engine_flags(fit)
    fit.set_defaults(run=cmd_fit)

    diagnose = verbs.add_parser("diagnose", help="summary, checks and plots of a run folder; exit 1 if a check fails")
    diagnose.add_argument("dir", metavar="DIR", help="run folder")
    diagnose.add_argument("--html", action="store_true", help="also write DIR/report.html, one self-contained file")
    diagnose.set_defaults(run=cmd_diagnose)

    sample = verbs.add_parser("sample", help="new data from a fitted model",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sample.add_argument("dir", metavar="DIR", help="run folder")
    sample.add_argument("-n", type=int, required=True, help="number of new data points")
    sample.add_argument("--out", default=None, help="CSV file to write (default: standard output)")
    sample.add_argument("--seed", type=int, default=0, help="random seed")
    sample.set_defaults(run=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    from latentkit.interrupt import RunStopped

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RunStopped as error:  # the fit printed how to resume
        return error.exit_code
    except InferenceError as error:
        print(f"latentkit: fit failed: {error}", file=sys.stderr)
        return 1
    except LatentkitError as error:
        print(f"latentkit: error: {error}", file=sys.stderr)
        return 2

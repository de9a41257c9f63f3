"""The latentkit command end to end, in a temporary folder."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from latentkit.cli import main


def run(*args: str, cwd) -> subprocess.CompletedProcess:
    # One intra-op thread, as in this process (conftest): small tensors gain nothing from more,
    # and spinning OpenMP threads crawl when the cores are shared.
    return subprocess.run([sys.executable, "-m", "latentkit", *args], cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def csv(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 1, (80, 2)), rng.normal(3, 1, (80, 2))])
    path = tmp_path / "data.csv"
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "label": ["u"] * 160}).to_csv(path, index=False)
    return path


def test_demo_smoke(tmp_path):
    out = run("demo", "--smoke", "--no-progress", "--out", "demo", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "run folder: demo/svi" in out.stdout and "run folder: demo/nuts" in out.stdout
    assert "r_hat" in out.stdout
    assert (tmp_path / "demo" / "nuts" / "inference.nc").is_file()


def test_fit_diagnose_sample(csv, tmp_path, capsys):
    code = main(["fit", "gmm", "--data", str(csv), "--columns", "a,b", "--components", "2",
                 "--engine", "svi", "--steps", "200", "--num-samples", "50", "--no-progress",
                 "--out", str(tmp_path / "run")])
    assert code == 0
    assert "run folder:" in capsys.readouterr().out
    assert main(["diagnose", str(tmp_path / "run")]) in (0, 1)
    assert (tmp_path / "run" / "plots" / "trace.png").is_file()
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "run"), "-n", "5", "--out", str(tmp_path / "new.csv")]) == 0
    new = pd.read_csv(tmp_path / "new.csv")
    assert list(new.columns) == ["a", "b"] and len(new) == 5


def test_fit_with_epochs_and_a_validation_file(csv, tmp_path, capsys):
    import latentkit as lk

    held_out = tmp_path / "held_out.csv"
    pd.read_csv(csv).sample(frac=0.5, random_state=0).to_csv(held_out, index=False)
    assert main(["fit", "gmm", "--data", str(csv), "--columns", "a,b", "--components", "2", "--engine", "svi",
                 "--epochs", "30", "--validation", str(held_out), "--num-samples", "20", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    validation = lk.load(tmp_path / "run").epoch_metrics["validation_elbo"]
    assert validation.shape == (30,) and validation[-1] > validation[0]


def test_poisson_hmm_map_point_estimate_fits_diagnoses_and_samples(tmp_path, capsys):
    import latentkit as lk

    lk.datasets.load_earthquakes().to_csv(tmp_path / "eq.csv", index=False)
    run_dir = str(tmp_path / "run")
    assert main(["fit", "poisson-hmm", "--data", str(tmp_path / "eq.csv"), "--columns", "count", "--states", "2",
                 "--engine", "svi", "--guide", "delta", "--steps", "300", "--num-samples", "1", "--no-progress",
                 "--out", run_dir]) == 0
    rates = np.sort(lk.load(run_dir).posterior["rates"][0, 0])
    np.testing.assert_allclose(rates, [15.5, 26.1], atol=1.0)  # Zucchini & MacDonald's 2-state MAP
    assert main(["diagnose", run_dir]) == 0  # one draw: no R-hat or LOO-PIT to compute, no crash
    capsys.readouterr()
    assert main(["sample", run_dir, "-n", "4"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 4


def test_categorical_hmm_needs_symbols(tmp_path, capsys):
    pd.DataFrame({"s": [0, 1, 2, 1]}).to_csv(tmp_path / "s.csv", index=False)
    assert main(["fit", "categorical-hmm", "--data", str(tmp_path / "s.csv"), "--engine", "svi"]) == 2
    assert "--symbols: categorical-hmm needs the number of symbols" in capsys.readouterr().err


def test_fit_nuts_and_diagnose_exit_codes(csv, tmp_path):
    out = run("fit", "gmm", "--data", str(csv), "--columns", "a,b", "--engine", "nuts",
              "--num-chains", "2", "--num-warmup", "60", "--num-samples", "60", "--no-progress",
              "--covariance", "diag", "--out", "run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    diag = run("diagnose", "run", cwd=tmp_path)
    assert diag.returncode in (0, 1)
    assert ("FAIL" in diag.stdout) == (diag.returncode == 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "gmm", "--data", "missing.csv"], "--data: no such file"),
        (["fit", "gmm", "--data", "{csv}"], "column 'label' is not numeric"),
        (["fit", "gmm", "--data", "{csv}", "--columns", "a,zz"], "--columns: ['zz'] not in"),
        (["fit", "gmm", "--data", "{csv}", "--columns", "a,b", "--engine", "nutz"], "unknown engine 'nutz'"),
        (["fit", "gmm", "--data", "{csv}", "--columns", "a,b", "--engine", "svi", "--num-chains", "2"],
         "num_chains: not an option of engine 'svi'"),
        (["fit", "gmm", "--data", "{csv}", "--columns", "a,b", "--components", "0"], "n_components"),
        (["fit", "hmmm", "--data", "{csv}"], "unknown model 'hmmm'"),
        (["diagnose", "nowhere"], "not a run folder"),
        (["sample", "nowhere", "-n", "3"], "not a run folder"),
        (["fit"], "the following arguments are required"),
    ],
)
def test_bad_arguments_exit_2(args, message, csv, tmp_path):
    out = run(*[a.replace("{csv}", str(csv)) for a in args], cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_help_lists_options_with_defaults(tmp_path):
    out = run("fit", "--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "--num-warmup" in out.stdout and "(default: 1000)" in out.stdout
    assert "--learning-rate" in out.stdout


@pytest.mark.parametrize("flags, expected", [(["--jit"], True), (["--jit", "inductor"], "inductor"),
                                             (["--no-jit"], False), ([], None)])
def test_the_jit_flag_is_a_switch_that_can_name_the_compiler(flags, expected):
    from latentkit.cli import _engine_options, build_parser

    args = build_parser().parse_args(["fit", "gmm", "--data", "x.csv", *flags])
    assert _engine_options(args).get("jit") == expected


def test_an_unknown_compiler_is_refused():
    from latentkit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "gmm", "--data", "x.csv", "--jit", "inducto"])

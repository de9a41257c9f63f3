"""Run folders: save -> load equality, atomic writes, refusal of bad folders."""

import json
import os

import numpy as np
import pytest

import latentkit as lk
from latentkit.errors import RunFolderError
from latentkit.runs import atomic_write


@pytest.fixture(scope="module")
def svi_result():
    X = lk.datasets.load_old_faithful()
    return lk.fit(lk.models.GaussianMixture(2), X, engine="svi", steps=60, num_samples=30,
                  seed=3, progress=False)


def test_round_trip(svi_result, tmp_path):
    folder = svi_result.save(tmp_path / "run", plots=True)
    for name in ("config.json", "inference.nc", "params.safetensors", "metrics.csv"):
        assert (folder / name).is_file()
    assert (folder / "plots" / "elbo.png").is_file()
    loaded = lk.load(folder)
    assert loaded == svi_result
    assert isinstance(loaded.model, lk.models.GaussianMixture)
    assert loaded.model.init_args == svi_result.model.init_args
    config = json.loads((folder / "config.json").read_text())
    assert config["engine"]["name"] == "svi" and config["seed"] == 3
    assert "torch" in config["versions"]
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_changed_result_is_not_equal(svi_result, tmp_path):
    loaded = lk.load(svi_result.save(tmp_path / "run", plots=False))
    loaded.posterior["locs"][0, 0, 0, 0] += 1e-9
    assert loaded != svi_result


def test_missing_and_corrupted_folders(svi_result, tmp_path):
    with pytest.raises(RunFolderError, match="not a run folder"):
        lk.load(tmp_path / "nope")
    folder = svi_result.save(tmp_path / "run", plots=False)
    (folder / "params.safetensors").write_bytes(b"garbage")
    with pytest.raises(RunFolderError, match="is corrupted"):
        lk.load(folder)
    (folder / "inference.nc").unlink()
    with pytest.raises(RunFolderError, match=r"lacks \['inference.nc'\]"):
        lk.load(folder)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def explode(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, explode)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_unwritable_folder(svi_result, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunFolderError, match="could not write the run folder"):
        svi_result.save(blocker / "run", plots=False)


def test_mcmc_metrics_per_draw(tmp_path):
    y = np.random.default_rng(0).normal(size=20)

    import pyro
    import pyro.distributions as dist

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)

    res = lk.fit(model, {"y": y}, engine="nuts", num_chains=2, num_warmup=50, num_samples=40,
                 progress=False)
    folder = res.save(tmp_path / "run", plots=True)
    metrics = (folder / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("chain,draw,lp,acceptance_rate")
    assert len(metrics) == 1 + 2 * 40
    assert lk.load(folder, model=model) == res
    assert {"trace.png", "rank.png", "ppc.png"} <= set(os.listdir(folder / "plots"))

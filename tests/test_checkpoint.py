"""Checkpoints: interrupted-and-resumed runs end bit-identical; bad checkpoints are handled."""

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import latentkit as lk
import latentkit.runs
from latentkit.checkpoint import (
    LATEST,
    PREVIOUS,
    CheckpointWarning,
    load_checkpoint,
    save_checkpoint,
)
from latentkit.errors import ConfigError, RunFolderError
from latentkit.interrupt import Interrupted, StopRequests, Terminated

X = lk.datasets.load_old_faithful()
OPTIONS = {"engine": "svi", "steps": 60, "num_samples": 10, "seed": 4, "progress": False, "checkpoint_every": 20}


def _cli(*args: str, cwd) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "latentkit", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def test_sigterm_then_resume_is_bit_identical(tmp_path):
    X.to_csv(tmp_path / "data.csv", index=False)
    common = ["fit", "gmm", "--data", "data.csv", "--engine", "svi", "--steps", "150", "--checkpoint-every",
              "30", "--num-samples", "20", "--no-progress", "--seed", "7"]
    run = _cli(*common, "--out", "run", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / LATEST).is_file():
        assert run.poll() is None and time.monotonic() < deadline, _finish(run)
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    code, err = _finish(run)
    assert code == 143, err
    assert "--resume run" in err and "resume='run'" in err
    step = json.loads((tmp_path / "run" / LATEST).read_text())["step"]
    assert 30 <= step < 150 and not (tmp_path / "run" / "params.safetensors").exists()
    resumed = _cli(*common, "--resume", "run", cwd=tmp_path)
    torch.set_default_dtype(torch.float32)  # as in the command
    try:
        b = lk.fit(lk.models.GaussianMixture(2, covariance="full"), X, engine="svi", steps=150, checkpoint_every=30,
                   num_samples=20, seed=7, progress=False)
    finally:
        torch.set_default_dtype(torch.float64)
    assert _finish(resumed)[0] == 0
    a = lk.load(tmp_path / "run")
    assert np.array_equal(a.losses, b.losses)
    assert a.params.keys() == b.params.keys() and all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert a == b  # the posterior draws after training too


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An SVI run with checkpoints at steps 40 (previous) and 60 (latest), and its result."""
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    result = lk.fit(lk.models.GaussianMixture(2), X, out=folder, **OPTIONS)
    return folder, result


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


def test_run_folder_holds_latest_and_previous(finished):
    folder, result = finished
    assert load_checkpoint(folder).step == 60
    assert json.loads((folder / PREVIOUS).read_text())["step"] == 40
    assert sorted(p.name for p in folder.glob("checkpoint-*.safetensors")) == [
        "checkpoint-00000040.safetensors", "checkpoint-00000060.safetensors"]
    assert lk.load(folder) == result


def test_truncated_latest_falls_back_to_previous(finished, tmp_path):
    folder, result = finished
    copy = _copy(folder, tmp_path)
    tensors = copy / "checkpoint-00000060.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    with pytest.warns(CheckpointWarning, match="SHA-256.*previous one at step 40"):
        assert load_checkpoint(copy).step == 40
    with pytest.warns(CheckpointWarning):
        resumed = lk.fit(lk.models.GaussianMixture(2), X, resume=copy, **OPTIONS)
    assert resumed == result
    (copy / LATEST).unlink()
    (copy / PREVIOUS).write_text("{not json")
    with pytest.raises(RunFolderError, match="no usable checkpoint"):
        load_checkpoint(copy)


def test_checkpoint_of_another_model_names_differences(finished, tmp_path):
    folder, _ = finished
    with pytest.raises(ConfigError, match=r"model.args.n_components: 2 in the checkpoint, 3 now.*seed: 4 in"):
        lk.fit(lk.models.GaussianMixture(3), X, resume=folder, **{**OPTIONS, "seed": 5})
    with pytest.raises(ConfigError, match=r"data.X: 'float64\[272, 2\].*learning_rate"):
        lk.fit(lk.models.GaussianMixture(2), X.iloc[:200], resume=folder, **{**OPTIONS, "learning_rate": 0.1})
    with pytest.raises(RunFolderError, match="no usable checkpoint"):
        lk.fit(lk.models.GaussianMixture(2), X, resume=tmp_path, **OPTIONS)
    with pytest.raises(ConfigError, match="writes no checkpoints"):
        lk.fit(lk.models.GaussianMixture(2), X, engine="nuts", resume=folder)


def test_full_disk_and_read_only_folder_keep_previous(finished, tmp_path, monkeypatch):
    folder, _ = finished
    copy = _copy(folder, tmp_path)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    checkpoint = load_checkpoint(copy)
    checkpoint.step = 80

    def full(tensors, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("latentkit.checkpoint.save_file", full)
    with pytest.raises(RunFolderError, match="No space left on device.*previous checkpoint is unchanged"):
        save_checkpoint(copy, checkpoint)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before
    copy.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root ignores permissions: write as user 'nobody' in a child process
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.setuid(65534)
                    save_checkpoint(copy, checkpoint)
                except RunFolderError as error:
                    code = 0 if "could not write a checkpoint" in str(error) else 1
                finally:
                    os._exit(code)
            assert os.waitpid(pid, 0)[1] == 0
        else:
            with pytest.raises(RunFolderError, match="could not write a checkpoint"):
                save_checkpoint(copy, checkpoint)
            with pytest.raises(RunFolderError, match="could not write a checkpoint"):
                lk.fit(lk.models.GaussianMixture(2), X, resume=copy, **{**OPTIONS, "steps": 80})
    finally:
        copy.chmod(0o755)
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before
    assert load_checkpoint(copy).step == 60


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("payload", ["pickle", "torch"])
def test_crafted_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint-00000010.safetensors"
    if payload == "pickle":
        evil.write_bytes(pickle.dumps({"param.x": _Exploit(str(marker))}))
    else:
        torch.save({"param.x": _Exploit(str(marker))}, evil)
    record = {"format": 1, "step": 10, "tensors": evil.name, "fingerprint": {}, "meta": {},
              "sha256": hashlib.sha256(evil.read_bytes()).hexdigest()}
    (tmp_path / LATEST).write_text(json.dumps(record))
    with pytest.raises(RunFolderError, match="not a safetensors file"):
        load_checkpoint(tmp_path)
    (tmp_path / LATEST).write_text(json.dumps({**record, "tensors": "../elsewhere.pt"}))
    with pytest.raises(RunFolderError, match="not a checkpoint file"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:jit. tracing the potential failed")
def test_sigterm_during_mcmc_keeps_completed_draws(tmp_path, monkeypatch):
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    original = latentkit.runs._draws_stop

    def signal_at_draw_12(stop, num_warmup):
        should_stop = original(stop, num_warmup)

        def wrapped(iteration):
            if iteration == num_warmup + 11:
                signal.raise_signal(signal.SIGTERM)
            return should_stop(iteration)

        return wrapped

    monkeypatch.setattr(latentkit.runs, "_draws_stop", signal_at_draw_12)
    handler = signal.getsignal(signal.SIGTERM)
    y = np.random.default_rng(0).normal(size=20)
    with pytest.raises(Terminated, match="after 12 of 50 draws of each of 2 chains") as stopped:
        lk.fit(model, {"y": y}, engine="nuts", num_chains=2, num_warmup=30, num_samples=50, progress=False,
               out=tmp_path / "run")
    assert stopped.value.exit_code == 143 and stopped.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is handler
    saved = lk.load(tmp_path / "run", model=model)
    assert saved.posterior["mu"].shape == (2, 12)
    assert saved.config["partial"] == {"signal": "SIGTERM", "draws": 12, "num_samples": 50}
    assert saved == stopped.value.result


def test_stop_requests_and_exit_codes():
    handler = signal.getsignal(signal.SIGINT)
    with StopRequests() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop() and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt, match="second signal"):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is handler
    assert issubclass(Interrupted, KeyboardInterrupt) and issubclass(Terminated, SystemExit)


def test_sigint_in_process_then_resume(finished, tmp_path, monkeypatch):
    _, result = finished
    handler = signal.getsignal(signal.SIGINT)
    original = StopRequests.__call__

    def signal_at_step_25(self, step=None):
        if step == 25:
            signal.raise_signal(signal.SIGINT)
        return original(self, step)

    monkeypatch.setattr(StopRequests, "__call__", signal_at_step_25)
    with pytest.raises(Interrupted, match="SIGINT: stopped SVI after step 26 of 60") as stopped:
        lk.fit(lk.models.GaussianMixture(2), X, out=tmp_path / "run", **OPTIONS)
    assert stopped.value.exit_code == 130 and signal.getsignal(signal.SIGINT) is handler
    assert load_checkpoint(tmp_path / "run").step == 26
    monkeypatch.undo()
    assert lk.fit(lk.models.GaussianMixture(2), X, resume=tmp_path / "run", **OPTIONS) == result


def test_command_line_resume_errors(finished, tmp_path, capsys):
    from latentkit.cli import main

    folder, _ = finished
    X.to_csv(tmp_path / "data.csv", index=False)
    base = ["fit", "gmm", "--data", str(tmp_path / "data.csv"), "--no-progress", "--resume", str(folder)]
    assert main([*base, "--engine", "nuts"]) == 2
    assert "resume: engine 'nuts' writes no checkpoints" in capsys.readouterr().err
    assert main([*base, "--engine", "svi", "--out", str(tmp_path / "elsewhere")]) == 2
    assert "--out: --resume continues in its own folder" in capsys.readouterr().err
    assert main([*base, "--engine", "svi", "--steps", "60", "--seed", "5"]) == 2
    assert "seed: 4 in the checkpoint, 5 now" in capsys.readouterr().err


class _Regression(lk.models.base.LatentModel):
    """A network weight (a module parameter, optimised with the guide) and a latent noise scale."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(2, 1)
        self.init_args = {}

    def prepare(self, data):
        return {"X": torch.as_tensor(data[:, :2]), "y": torch.as_tensor(data[:, 2]), "subsample_size": None}

    def model(self, X, y, subsample_size=None):
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(X), subsample_size=subsample_size) as index:
            pyro.sample("obs", dist.Normal(self.net(X[index]).squeeze(-1), sigma), obs=y[index])


def test_module_parameters_resume_bit_identical(tmp_path):
    data = np.random.default_rng(0).normal(size=(100, 3))
    options = {"engine": "svi", "num_samples": 5, "batch_size": 30, "seed": 1, "progress": False}

    def fresh():
        torch.manual_seed(0)  # the same initial network weights
        return _Regression()

    lk.fit(fresh(), data, steps=20, out=tmp_path / "run", **options)
    resumed = lk.fit(fresh(), data, steps=30, resume=tmp_path / "run", **options)
    uninterrupted = lk.fit(fresh(), data, steps=30, **options)
    assert "model.net.weight" in resumed.params
    assert resumed == uninterrupted

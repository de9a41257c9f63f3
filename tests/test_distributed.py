"""torch.distributed: sharded minibatches; two gloo processes under torchrun (fit, resume, MCMC, the command)
against one process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import latentkit as lk
from latentkit.distributed import Minibatches
from latentkit.errors import ConfigError

X = lk.datasets.load_old_faithful()
SVI = {"engine": "svi", "steps": 40, "batch_size": 64, "learning_rate": 0.05, "num_samples": 10, "seed": 3,
       "progress": False}

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, pyro, pyro.distributions as dist, torch
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    import latentkit as lk
    from latentkit.cli import main
    out = sys.argv[1]
    X = lk.datasets.load_old_faithful()
    svi = json.loads(sys.argv[2])
    lk.fit(lk.models.GaussianMixture(2), X, distributed=True, out=out + "/svi", **svi)
    svi["steps"] += 10  # and continue from the last checkpoint, on both processes
    lk.fit(lk.models.GaussianMixture(2), X, distributed=True, resume=out + "/svi", **svi)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = np.random.default_rng(0).normal(size=20)
    res = lk.fit(model, {"y": y}, engine="nuts", num_chains=3, num_warmup=40, num_samples=25, seed=2,
                 progress=False, distributed=True)
    if torch.distributed.get_rank() == 0:
        json.dump({"mu": res.posterior["mu"].tolist(), "config": res.config["distributed"]},
                  open(out + "/nuts.json", "w"))
    data = out + f"/data{torch.distributed.get_rank()}.csv"
    X.to_csv(data, index=False)
    code = main(["fit", "gmm", "--data", data, "--engine", "svi", "--steps", "5", "--batch-size", "32",
                 "--num-samples", "5", "--no-progress", "--out", out + "/cli"])
    sys.exit(code)
""")


def test_minibatches_shard_the_global_batch():
    whole = Minibatches(272, 64, seed=1)
    shards = [Minibatches(272, 64, seed=1, rank=r, world_size=3) for r in range(3)]
    assert [s.local_size for s in shards] == [22, 21, 21] and sum(s.weight for s in shards) == 1
    seen = []
    for step in range(whole.size // 64 + 1):  # into the second epoch
        parts = [s.indices(step) for s in shards]
        assert sorted(torch.cat(parts).tolist()) == sorted(whole.indices(step).tolist())
        seen += whole.indices(step).tolist() if step < 4 else []
    assert len(set(seen)) == 4 * 64  # one epoch: no point twice
    full = [Minibatches(5, None, seed=0, rank=r, world_size=2).indices(0).tolist() for r in range(2)]
    assert full == [[0, 2, 4], [1, 3]]
    with pytest.raises(ConfigError, match="batch_size: 300 is larger than the data"):
        Minibatches(272, 300, seed=0)


def test_distributed_outside_torchrun_is_refused(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="distributed: no torch.distributed environment.*torchrun"):
        lk.fit(lk.models.GaussianMixture(2), X, distributed=True, **SVI)


def test_two_gloo_processes_match_one(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), str(tmp_path), json.dumps({k: v for k, v in SVI.items() if k != "progress"})]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    two = lk.load(tmp_path / "svi")
    one = lk.fit(lk.models.GaussianMixture(2), X, **{**SVI, "steps": SVI["steps"] + 10})
    assert two.params.keys() == one.params.keys()
    for name in one.params:  # the same global batches; only the order of the sums differs
        torch.testing.assert_close(two.params[name], one.params[name], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(two.losses, one.losses, rtol=1e-10)
    assert two.config["engine"]["options"]["distributed"] is True

    nuts = json.loads((tmp_path / "nuts.json").read_text())
    mu = np.array(nuts["mu"])
    assert mu.shape == (3, 25) and len({tuple(chain) for chain in mu}) == 3
    assert nuts["config"] == {"world_size": 2, "chain_seeds": [4, 5], "chains_per_rank": [2, 1]}
    assert (tmp_path / "cli" / "inference.nc").is_file()

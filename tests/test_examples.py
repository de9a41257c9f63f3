"""Every example runs with --smoke, and every example is listed here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).parents[1] / "examples"
EXAMPLES = ["diffusion_two_moons.py", "eight_schools.py", "gmm_old_faithful.py", "hmm_earthquakes.py", "vae_digits.py"]


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES_DIR.glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    # One intra-op thread, as in this process (conftest): spinning OpenMP threads crawl on shared cores.
    out = subprocess.run([sys.executable, str(EXAMPLES_DIR / name), "--smoke"], cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]

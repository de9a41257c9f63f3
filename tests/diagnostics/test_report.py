"""Plots and the self-contained HTML report, from Python and from ``latentkit diagnose``."""

import base64
import re
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy import stats

import latentkit as lk
from latentkit.cli import main
from latentkit.diagnostics import plots, write_report
from latentkit.inference import Result


class Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, name, value or "") for name, value in attrs]

    def handle_data(self, data):
        self.text.append(data)


def assert_self_contained(text: str) -> Collector:
    parser = Collector()
    parser.feed(text)
    parser.close()
    assert parser.tags[0] == "html" and "body" in parser.tags
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    images = [value for tag, name, value in parser.attrs if tag == "img" and name == "src"]
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    for src in images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for _, name, value in parser.attrs:
        if name in ("src", "href", "srcset", "action", "poster"):
            assert value.startswith("data:"), value
    assert not re.search(r"url\(|@import|https?://", "".join(parser.text[:2]) + text.split("</style>")[0])
    return parser


@pytest.fixture(scope="module")
def mcmc_result() -> Result:
    """Four chains of y ~ Normal(mu, 1) with sampler statistics, one divergence."""
    rng = np.random.default_rng(0)
    y = rng.normal(1.0, 1.0, 25)
    mu = y.mean() + rng.normal(size=(4, 200)) / 5
    diverging = np.zeros((4, 200), bool)
    diverging[2, 5] = True
    return Result(
        posterior={"mu": mu, "sigma": np.exp(0.1 * rng.normal(size=(4, 200)))},
        sample_stats={"diverging": diverging, "energy": rng.normal(size=(4, 200)), "tree_depth": np.ones((4, 200))},
        log_likelihood={"y": stats.norm.logpdf(y, mu[..., None], 1.0)},
        posterior_predictive={"y": rng.normal(mu[..., None], 1.0, (4, 200, 25))},
        observed_data={"y": y},
        config={"engine": {"name": "nuts", "options": {"max_tree_depth": 10}}, "seed": 0},
    )


def test_plot_functions_return_figures_and_write_pngs(mcmc_result, tmp_path):
    for make in (plots.plot_trace, plots.plot_rank, plots.plot_pair, plots.plot_energy, plots.plot_ppc,
                 plots.plot_loo_pit):
        assert isinstance(make(mcmc_result), Figure)
    plt.close("all")
    written = plots.write_plots(mcmc_result, tmp_path)
    assert {p.name for p in written} == {"trace.png", "pair.png", "rank.png", "energy.png", "ppc.png",
                                         "loo_pit.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_html_report_of_an_mcmc_result(mcmc_result, tmp_path):
    path = write_report(mcmc_result, tmp_path / "report.html")
    parser = assert_self_contained(path.read_text())
    rows = [value for tag, name, value in parser.attrs if tag == "tr" and name == "class"]
    assert "fail" in rows and "pass" in rows  # the divergence fails, R-hat passes
    text = " ".join(parser.text)
    assert "divergences" in text and "Posterior predictive checks of y" in text and '"max_tree_depth": 10' in text


def test_diagnose_command_writes_the_report(tmp_path, capsys):
    X = np.random.default_rng(0).normal(size=(60, 2))
    res = lk.fit(lk.models.GaussianMixture(n_components=2, covariance="diag"), X, engine="svi", steps=100,
                 learning_rate=0.05, num_samples=60, progress=False)
    res.save(tmp_path / "run", plots=False)
    code = main(["diagnose", str(tmp_path / "run"), "--html"])
    out = capsys.readouterr().out
    assert code == (1 if "FAIL" in out else 0)
    assert "pareto_k" in out and "elbo_converged" in out and "report.html" in out
    assert (tmp_path / "run" / "plots" / "elbo.png").is_file()
    parser = assert_self_contained((tmp_path / "run" / "report.html").read_text())
    assert sum(tag == "img" for tag in parser.tags) >= 4

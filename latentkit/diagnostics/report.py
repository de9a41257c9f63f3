"""A self-contained HTML report of one run: configuration, checks, summary, plots.

One file with inline CSS and every image embedded as a ``data:`` URI: no scripts, no external
styles or fonts, so it opens in any browser, offline, and prints.
"""

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from latentkit.diagnostics import plots
from latentkit.diagnostics.checks import CheckReport, check
from latentkit.inference.result import Result
from latentkit.runs import atomic_write

__all__ = ["render_report", "write_report"]

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 70em;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f2f2f2; } td.text { text-align: left; }
tr.pass td.verdict { background: #d9f2d9; color: #175917; font-weight: bold; }
tr.warn td.verdict { background: #fff2cc; color: #7a5b00; font-weight: bold; }
tr.fail td.verdict { background: #f8d0d0; color: #8b1a1a; font-weight: bold; }
.banner { padding: .6em 1em; border-radius: 4px; font-weight: bold; }
.banner.pass { background: #d9f2d9; } .banner.fail { background: #f8d0d0; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
figure { margin: 1em 0; page-break-inside: avoid; } figcaption { font-size: .9em; color: #555; }
img { max-width: 100%; height: auto; }
@media print { body { max-width: none; margin: 0; } h2 { page-break-after: avoid; } }
"""


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _check_table(report: CheckReport) -> str:
    rows = []
    for c in report.checks:
        rows.append(f'<tr class="{c.verdict}"><td class="text">{html.escape(c.name)}</td>'
                    f'<td class="verdict">{c.verdict}</td><td>{c.value:.4g}</td>'
                    f'<td>{html.escape(c.threshold)}</td><td class="text">{html.escape(c.reason)}</td></tr>')
    head = "<tr><th>check</th><th>verdict</th><th>value</th><th>needs</th><th>reason</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _caption(stem: str) -> str:
    base = next((k for k in plots.CAPTIONS if stem == k or stem.startswith(k + "_")), stem)
    site = stem[len(base) + 1:]
    return plots.CAPTIONS.get(base, stem) + (f" ({site})" if site else "")


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_report(result: Result, title: str = "latentkit run", images: Sequence[Path] | None = None) -> str:
    """The report as one HTML string.

    Args:
        result: the fitted result.
        title: the page title.
        images: PNG files already drawn by :func:`~latentkit.diagnostics.plots.write_plots` (named by
            their plot, e.g. ``trace.png``) to embed instead of drawing the standard plots again.
    """
    from latentkit.diagnostics.ppc import ppc

    report = check(result)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="banner {"pass" if report.passed else "fail"}">'
             f'{"All checks passed" if report.passed else "Some checks failed"} '
             f"(engine: {html.escape(result.engine)}, {result.num_chains} chain(s) x {result.num_draws} draws)</p>",
             "<h2>Checks</h2>", _check_table(report)]
    if report.psis_means:
        rows = "".join(f"<tr><td class='text'>{html.escape(k)}</td><td>{np.round(v['guide'], 4)}</td>"
                       f"<td>{np.round(v['psis'], 4)}</td></tr>" for k, v in report.psis_means.items())
        parts += ["<h3>PSIS-corrected posterior means</h3>",
                  f"<table><tr><th>variable</th><th>guide mean</th><th>PSIS-corrected</th></tr>{rows}</table>"]
    with pd.option_context("display.precision", 3):
        summary = result.summary().round(3)
    parts += ["<h2>Summary</h2>", summary.to_html(border=0)]
    for site in plots.predictive_sites(result):
        checks = ppc(result, var_name=site)
        figure = _png(plots.plot_ppc_statistics(checks.table, checks.replicated))
        parts += [f"<h2>Posterior predictive checks of {html.escape(site)}</h2>",
                  checks.table.round(4).to_html(border=0),
                  f'<figure><img alt="test statistics of {html.escape(site)}" src="{figure}"><figcaption>Test '
                  "statistics over the posterior predictive draws; the line: observed</figcaption></figure>"]
        if checks.pit_ks is not None:
            parts.append(f"<p>LOO-PIT against U(0, 1): KS statistic {checks.pit_ks[0]:.3f}, "
                         f"p = {checks.pit_ks[1]:.3g}</p>")
    parts.append("<h2>Plots</h2>")
    drawn = ([(p.stem, lambda p=p: _embed(p)) for p in images] if images is not None
             else [(stem, lambda make=make: _png(make())) for stem, make in plots.standard_plots(result)])
    for stem, source in drawn:
        caption = _caption(stem)
        parts.append(f'<figure><img alt="{html.escape(caption)}" src="{source()}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    config = json.dumps(result.config, indent=2, default=str)
    parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(config)}</pre>"]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_report(result: Result, path: str | Path, title: str | None = None,
                 images: Sequence[Path] | None = None) -> Path:
    """Write :func:`render_report` to ``path`` (e.g. ``runs/gmm/report.html``) atomically."""
    path = Path(path)
    text = render_report(result, title or f"latentkit run {path.parent.name}", images)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path

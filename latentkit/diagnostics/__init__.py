"""Diagnostics built on ArviZ: checks with verdicts, model comparison, posterior predictive
checks, simulation-based calibration, relabelling, plots and the HTML report."""

from latentkit.diagnostics.checks import Check, CheckReport, check
from latentkit.diagnostics.compare import Comparison, compare
from latentkit.diagnostics.plots import (
    plot_elbo,
    plot_energy,
    plot_loo_pit,
    plot_pair,
    plot_ppc,
    plot_ppc_statistics,
    plot_rank,
    plot_sbc_ranks,
    plot_trace,
    write_plots,
)
from latentkit.diagnostics.ppc import PPCReport, loo_pit, ppc
from latentkit.diagnostics.quality import SampleQuality, sample_quality
from latentkit.diagnostics.relabel import relabel, relabel_result
from latentkit.diagnostics.report import write_report
from latentkit.diagnostics.sbc import SBCResult, sbc

__all__ = ["Check", "CheckReport", "Comparison", "PPCReport", "SBCResult", "SampleQuality", "check", "compare",
           "loo_pit",
           "plot_elbo", "plot_energy", "plot_loo_pit", "plot_pair", "plot_ppc", "plot_ppc_statistics", "plot_rank",
           "plot_sbc_ranks", "plot_trace", "ppc",
           "relabel", "relabel_result", "sample_quality", "sbc", "write_plots", "write_report"]

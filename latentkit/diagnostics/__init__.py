"""ArviZ-based diagnostics: convergence checks with verdicts, and plots."""

from latentkit.diagnostics.checks import Check, CheckReport, check

__all__ = ["Check", "CheckReport", "check"]

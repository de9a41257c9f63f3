"""Exception types raised by latentkit.

Every message names the argument, what was wrong with it, and how to fix it.
"""

__all__ = ["LatentkitError", "DataError", "ConfigError", "InferenceError", "RunFolderError"]


class LatentkitError(Exception):
    """Base class of every error latentkit raises on purpose."""


class DataError(LatentkitError, ValueError):
    """Bad input data: NaN/inf, wrong shape or dtype, empty input, values outside the support."""


class ConfigError(LatentkitError, ValueError):
    """Unknown engine, guide, option or an option value out of range."""


class InferenceError(LatentkitError, RuntimeError):
    """A fit that broke: NaN loss, no valid initial point, a model that raised for the data."""


class RunFolderError(LatentkitError, OSError):
    """A run folder that is missing, incomplete or corrupted, or cannot be written."""

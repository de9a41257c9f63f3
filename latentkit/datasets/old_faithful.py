"""Old Faithful geyser eruptions (272 x 2).

Source: the ``faithful`` data set of R's ``datasets`` package (R Core Team, GPL-2 | GPL-3
distribution; the measurements themselves are public facts), originally from
W. Härdle, *Smoothing Techniques with Implementation in S* (1991), and
A. Azzalini & A. W. Bowman, "A look at some data on the Old Faithful geyser",
Applied Statistics 39 (1990) 357-365. Columns: ``eruptions`` (eruption time, minutes),
``waiting`` (waiting time to the next eruption, minutes).
"""

from importlib import resources

import pandas as pd

__all__ = ["load_old_faithful"]


def load_old_faithful() -> pd.DataFrame:
    """Return the Old Faithful data as a DataFrame with columns ``eruptions``, ``waiting``.

    Example:
        >>> load_old_faithful().shape
        (272, 2)
    """
    with resources.files("latentkit.datasets").joinpath("data/old_faithful.csv").open() as f:
        return pd.read_csv(f)

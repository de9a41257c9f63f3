"""Yearly counts of major earthquakes (magnitude 7 or more) worldwide, 1900-2006 (107 years).

Source: W. Zucchini and I. L. MacDonald, *Hidden Markov Models for Time Series: An Introduction
Using R*, Chapman & Hall/CRC (2009), chapter 1, the series used throughout the book as the
classic Poisson-HMM example (compiled, as the book states, from the US Geological Survey's
earthquake data base; USGS data are public domain). Mean 19.36 and variance 51.57 counts per
year, as quoted there: overdispersed for a single Poisson, well described by a 2- or 3-state
Poisson HMM. Columns: ``year``, ``count``.
"""

from importlib import resources

import pandas as pd

__all__ = ["load_earthquakes"]


def load_earthquakes() -> pd.DataFrame:
    """Return the earthquake counts as a DataFrame with columns ``year``, ``count``.

    Example:
        >>> frame = load_earthquakes()
        >>> frame.shape, int(frame["year"].iloc[0]), round(float(frame["count"].mean()), 2)
        ((107, 2), 1900, 19.36)
    """
    with resources.files("latentkit.datasets").joinpath("data/earthquakes.csv").open() as f:
        return pd.read_csv(f)

"""Bad input is refused with a DataError that names the argument and the fix."""

import numpy as np
import pandas as pd
import pytest

import latentkit as lk
from latentkit.errors import ConfigError, DataError


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (np.array([[1.0, np.nan], [2.0, 3.0]]), "NaN or infinite"),
        (np.array([[1.0, np.inf], [2.0, 3.0]]), "NaN or infinite"),
        (np.arange(5.0), r"2-D array.*x.reshape\(-1, 1\)"),
        (np.zeros((3, 2, 2)), "2-D array"),
        (np.zeros((0, 2)), "is empty"),
        (pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]}), "column 'b' is not numeric"),
        (np.array([["a", "b"], ["c", "d"]]), "expected numbers"),
    ],
)
def test_gmm_bad_data(data, match):
    with pytest.raises(DataError, match=match):
        lk.models.GaussianMixture(2).prepare(data)


def test_more_components_than_points():
    with pytest.raises(DataError, match="n_components: 5 components need at least"):
        lk.models.GaussianMixture(5).prepare(np.zeros((3, 2)))


@pytest.mark.parametrize("k", [0, -1, 1.5, "3"])
def test_bad_n_components(k):
    with pytest.raises(ConfigError, match="n_components"):
        lk.models.GaussianMixture(k)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError) and issubclass(ConfigError, ValueError)

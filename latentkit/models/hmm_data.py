"""Reading HMM data: one sequence, a list of sequences of any lengths, or a long DataFrame.

Sequences are validated one by one (each error names the sequence), then padded at the end to
the longest length with a mask, never truncated.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from latentkit.errors import DataError

__all__ = ["Sequences", "read_sequences"]


@dataclass(frozen=True)
class Sequences:
    """Validated sequences, padded.

    Shapes:
        ``values``: (N, T_max, D) float for real-valued emissions, (N, T_max) otherwise, 0 at
        padded steps; ``mask``: (N, T_max) bool, or None when all sequences have one length;
        ``lengths``: (N,).

    Attributes:
        ids: one identifier per sequence (DataFrame sequence ids, else 0..N-1).
        features: column names of a DataFrame's value columns, else None.
        single: the data was one sequence (results are returned unwrapped, not as a list).
    """

    values: torch.Tensor
    mask: torch.Tensor | None
    lengths: np.ndarray
    ids: list[Any]
    features: list[str] | None
    single: bool

    def unpad(self, array: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Split an (N, T_max, ...) array into the sequences' own lengths: one (T, ...) array
        for single-sequence data, else a list of N arrays (T_n, ...)."""
        parts = [array[i, : int(n)] for i, n in enumerate(self.lengths)]
        return parts[0] if self.single else parts


Check = Callable[[np.ndarray, str], np.ndarray]


def _is_sequence_container(data: Any) -> bool:
    if not isinstance(data, (list, tuple)) or not data:
        return False
    return all(isinstance(x, (list, tuple, np.ndarray, torch.Tensor, pd.Series, pd.DataFrame)) for x in data)


def _as_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, (pd.Series, pd.DataFrame)):
        frame = value.to_frame() if isinstance(value, pd.Series) else value
        for column in frame.columns:
            if not pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column]):
                raise DataError(f"{name}: column {column!r} is not numeric (dtype {frame[column].dtype}); "
                                "convert it or select numeric columns.")
        array = frame.to_numpy()
        return array[:, 0] if isinstance(value, pd.Series) else array
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise DataError(f"{name}: could not be read as an array ({error}).") from error
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DataError(f"{name}: expected numbers, got dtype {array.dtype}; convert it to numbers.")
    return array


def _validate(array: np.ndarray, name: str, check: Check) -> np.ndarray:
    if array.shape[0] == 0:
        raise DataError(f"{name}: is an empty sequence (length 0); drop it or pass at least one time step.")
    values = array.astype(float)
    if not np.isfinite(values).all():
        where = np.argwhere(~np.isfinite(values))[0].tolist()
        raise DataError(f"{name}: contains NaN or infinite values (first at time step {where[0]}, index "
                        f"{where}); drop or impute them before fitting.")
    return check(array, name)


def read_sequences(data: Any, check: Check, *, sequence_column: str | None = None,
                   ) -> tuple[list[tuple[Any, np.ndarray]], bool]:
    """Split data into ``(id, array)`` sequences, each validated by ``check(array, name)``, and
    say whether the data was a single sequence.

    Accepted: one array-like sequence; a list or tuple of them; a DataFrame (or Series) whose rows
    are time steps, split by ``sequence_column`` when given (long format; rows keep their order
    within each sequence, sequences in order of first appearance).

    Raises:
        DataError: no data, a non-numeric column, an unknown ``sequence_column``, an empty
            sequence, NaN or inf, or what ``check`` rejects.
    """
    if data is None:
        raise DataError("data: is None; pass one sequence (array) or several (a list of arrays).")
    if isinstance(data, pd.DataFrame) and sequence_column is not None:
        if sequence_column not in data.columns:
            raise DataError(f"sequence_column: {sequence_column!r} is not a column of data; its columns are "
                            f"{list(data.columns)}.")
        if data.empty:
            raise DataError("data: the DataFrame has no rows; pass at least one time step.")
        values = data.drop(columns=[sequence_column])
        if values.shape[1] == 0:
            raise DataError(f"data: has no value column besides {sequence_column!r}; add the observations.")
        out = []
        for key, group in values.groupby(data[sequence_column], sort=False):
            name = f"data (sequence {key!r})"
            out.append((key, _validate(_as_array(group, name), name, check)))
        return out, False
    if _is_sequence_container(data):
        return [(i, _validate(_as_array(x, f"data[{i}]"), f"data[{i}]", check)) for i, x in enumerate(data)], False
    if isinstance(data, (list, tuple)) and not data:
        raise DataError("data: is an empty list; pass at least one sequence.")
    array = _as_array(data, "data")
    if array.ndim == 0:
        raise DataError("data: is a single number; pass a sequence of observations.")
    return [(0, _validate(array, "data", check))], True


def pad(sequences: list[tuple[Any, np.ndarray]], *, dtype: torch.dtype, single: bool,
        features: list[str] | None) -> Sequences:
    """Pad validated sequences at the end (with 0) into a :class:`Sequences`."""
    lengths = np.array([len(a) for _, a in sequences])
    T = int(lengths.max())
    first = sequences[0][1]
    values = np.zeros((len(sequences), T) + first.shape[1:], dtype=first.dtype)
    for i, (_, array) in enumerate(sequences):
        values[i, : len(array)] = array
    mask = None
    if (lengths != T).any():
        mask = torch.as_tensor(np.arange(T)[None, :] < lengths[:, None])
    return Sequences(values=torch.as_tensor(values, dtype=dtype), mask=mask, lengths=lengths,
                     ids=[key for key, _ in sequences], features=features, single=single)

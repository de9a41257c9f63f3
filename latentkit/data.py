"""Input conversion and validation shared by models and engines.

Everything that enters a model passes through here, so that bad input fails early with a
:class:`~latentkit.errors.DataError` that names the argument, instead of deep inside Pyro.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from latentkit.errors import DataError

__all__ = ["as_matrix", "as_numeric_array", "as_tensor", "as_model_kwargs", "masked_observations"]


def _check_finite(array: np.ndarray, name: str) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0].tolist()
        raise DataError(
            f"{name}: contains NaN or infinite values (first at index {bad}); "
            "drop or impute those entries before fitting."
        )


def _numeric_frame(frame: pd.DataFrame, name: str) -> np.ndarray:
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(
            frame[column]
        ):
            example = frame[column].iloc[0] if len(frame) else None
            raise DataError(
                f"{name}: column {column!r} is not numeric (dtype {frame[column].dtype}, "
                f"e.g. {example!r}); select numeric columns (CLI: --columns) or convert it."
            )
    return frame.to_numpy(dtype=float)


def as_numeric_array(value: Any, name: str, *, allow_bool: bool = False) -> np.ndarray:
    """A tensor, array or nested list as a NumPy array of numbers (booleans only if ``allow_bool``).

    Raises:
        DataError: it cannot be read as an array, or holds strings or objects.
    """
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise DataError(f"{name}: could not be read as an array ({error}).") from error
    if not (np.issubdtype(array.dtype, np.number) or (allow_bool and array.dtype == bool)):
        raise DataError(f"{name}: expected numbers, got dtype {array.dtype}; convert strings to numbers "
                        "or select numeric columns.")
    return array


def as_matrix(
    data: Any,
    name: str = "data",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Validate an (N, D) table of real numbers and return it as a float tensor.

    Args:
        data: a NumPy array, torch tensor, pandas DataFrame or nested list of shape (N, D).
        name: the argument name used in error messages.
        dtype: float dtype of the result (default: torch's default dtype).
        device: device of the result.

    Raises:
        DataError: empty input, a 1-D or 3-D array, non-numeric columns, NaN or inf.
    """
    if isinstance(data, pd.Series):
        raise DataError(f"{name}: expected a 2-D table (N, D), got a pandas Series; use "
                        "series.to_frame() for one column.")
    array = _numeric_frame(data, name) if isinstance(data, pd.DataFrame) else as_numeric_array(data, name)
    if array.ndim != 2:
        raise DataError(
            f"{name}: expected a 2-D array of shape (N, D), got shape {array.shape}; "
            + ("reshape a single feature with x.reshape(-1, 1)." if array.ndim == 1
               else "flatten the trailing dimensions or pass one table.")
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{name}: is empty (shape {array.shape}); pass at least one row and "
                        "one column.")
    _check_finite(array.astype(float), name)
    return torch.as_tensor(array.astype(float), dtype=dtype or torch.get_default_dtype(),
                           device=device)


def as_tensor(value: Any, name: str, *, device: torch.device | str | None = None) -> Any:
    """Convert array-like model inputs to tensors; leave scalars, strings and None alone.

    Floats become torch's default float dtype, integers ``torch.long``, booleans ``torch.bool``.
    """
    if isinstance(value, (pd.DataFrame, pd.Series)):
        value = value.to_numpy()
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], str):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        if value.dtype == object or not (np.issubdtype(value.dtype, np.number)
                                          or value.dtype == bool):
            raise DataError(f"{name}: expected numbers, got dtype {value.dtype}.")
        _check_finite(value, name)
        if np.issubdtype(value.dtype, np.floating):
            value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        else:
            value = torch.as_tensor(value)
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not torch.isfinite(value).all():
            _check_finite(value.detach().cpu().numpy(), name)
        if device is not None:
            value = value.to(device)
    return value


def as_model_kwargs(
    data: Mapping[str, Any] | None, *, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Validate the data dict of a plain Pyro function: its keyword arguments by name."""
    if data is None:
        return {}
    if not isinstance(data, Mapping) or isinstance(data, pd.DataFrame):
        raise DataError(
            f"data: a plain Pyro function takes a dict of its keyword arguments, got "
            f"{type(data).__name__}; pass e.g. {{'x': x, 'y': y}}."
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise DataError(f"data: key {key!r} is not a valid keyword argument name.")
        kwargs[key] = as_tensor(value, f"data[{key!r}]", device=device)
    return kwargs


def masked_observations(data: Any, shape: tuple[int, ...], dtype: torch.dtype, source: str) -> dict[str, torch.Tensor]:
    """Observations ``y`` of points of ``shape`` with an optional mask, as a model's keyword arguments.

    ``data`` is ``y`` itself or ``{"y": y, "mask": mask}``; one point may drop the leading axis. The mask
    (true where observed) may have the shape of ``y`` or of one point; unobserved entries of ``y`` may
    be NaN and are set to 0. ``source`` says where ``shape`` comes from, for error messages.

    Shapes:
        returns ``{"y": (N, *shape), "mask": (N, *shape) bool}``.
    """
    mask = None
    if isinstance(data, Mapping):
        unknown = set(data) - {"y", "mask"}
        if unknown or "y" not in data:
            raise DataError(f"data: a dict takes keys 'y' and optionally 'mask', got {sorted(data)}.")
        data, mask = data["y"], data.get("mask")
    y = as_numeric_array(data, "y", allow_bool=True).astype(float)
    if y.shape == shape:
        y = y[None]
    if y.ndim != len(shape) + 1 or y.shape[1:] != shape:
        raise DataError(f"y: {source} points of shape {shape}, so y must have shape (N, *{shape}) or {shape}; "
                        f"got {y.shape}.")
    if y.shape[0] == 0:
        raise DataError("y: is empty; pass at least one observation.")
    if mask is None:
        observed = np.ones(y.shape, dtype=bool)
    else:
        observed = as_numeric_array(mask, "mask", allow_bool=True)
        if not np.isin(observed, (0, 1)).all():
            raise DataError("mask: must be boolean (or 0/1), true where an entry is observed.")
        if observed.shape not in (y.shape, shape):
            raise DataError(f"mask: expected shape {y.shape} or {shape}, got {observed.shape}.")
        observed = np.broadcast_to(observed.astype(bool), y.shape)
    if not np.isfinite(y[observed]).all():
        raise DataError("y: contains NaN or infinite values in observed entries; set mask to False there.")
    return {"y": torch.as_tensor(np.where(observed, y, 0.0), dtype=dtype), "mask": torch.as_tensor(observed.copy())}

"""Names and small node builders that every lookup lowering shares."""

from __future__ import annotations

import numpy as np
from onnx import helper

from graphpass.weights import Replacement

# Every stored role name starts with this; `lookup.is_lookup_table` looks for it.
LUT_ROLE_PREFIX = "lut_"


def np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))


def int64s(r: Replacement, role: str, values: list[int]) -> str:
    return r.stored(f"{LUT_ROLE_PREFIX}{role}", np.array(values, dtype=np.int64))


def reshape(r: Replacement, name: str, current, target) -> str:
    if tuple(current) == tuple(target):
        return name
    return r.node("Reshape", [name, int64s(r, "shape", list(target))], f"{LUT_ROLE_PREFIX}reshaped")

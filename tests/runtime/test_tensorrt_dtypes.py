"""The TensorRT runtime's plain-data parts that need no TensorRT: plan I/O dtypes -> host buffers."""

from __future__ import annotations

import numpy as np
import pytest

from stdrc.runtime.backends.tensorrt import numpy_dtype, to_float32
from stdrc.runtime.errors import BundleError


@pytest.mark.parametrize("trt_name, dtype", [("FLOAT", "float32"), ("HALF", "float16"), ("BF16", "bfloat16"),
                                             ("FP8", "float8_e4m3fn"), ("INT64", "int64"), ("BOOL", "bool")])
def test_plan_io_dtypes_map_to_numpy(trt_name: str, dtype: str) -> None:
    """`trt.nptype` raises for BF16 and FP8; the runtime's own mapping covers them (ml_dtypes)."""
    assert numpy_dtype(trt_name).name == dtype
    values = np.linspace(-2, 2, 8, dtype=np.float32)
    host = np.ascontiguousarray(values, dtype=numpy_dtype(trt_name))
    back = to_float32(host)
    floating = dtype.startswith(("float", "bfloat"))
    assert back.dtype == (np.float32 if floating else host.dtype)
    if floating:
        np.testing.assert_allclose(back, values, atol=0.25)  # fp8 E4M3 keeps 3 mantissa bits


def test_unknown_plan_io_dtype_is_refused() -> None:
    with pytest.raises(BundleError, match="rebuild the plan"):
        numpy_dtype("FP4")

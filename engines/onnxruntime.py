"""ONNX Runtime engines: the graph optimised offline and saved, fp32 for CPU, fp16 for the CUDA EP."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from stdrc.export.errors import ExportError

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16")


def uses_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def build_ort_engine(onnx_path: Path, out_path: Path, precision: str = "fp32") -> dict:
    """Optimise `onnx_path` (ORT 'extended' level: portable across CPUs) and save it at `out_path`."""
    if precision not in PRECISIONS:
        raise ExportError(f"ONNX Runtime engines are {' or '.join(PRECISIONS)}, not {precision}: "
                          "use --precision fp32 (CPU) or fp16 (CUDA EP); FP8 needs --backend tensorrt")
    source = onnx_path
    fd, tmp_src = tempfile.mkstemp(prefix=f".{out_path.stem}.src.", suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    try:
        if precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
            onnx.save(model, tmp_src)
            source = Path(tmp_src)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = tmp
        if uses_external_data(source):
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", out_path.name + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.log_severity_level = 3
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        onnx.checker.check_model(tmp)  # by path: works past 2 GB
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX Runtime could not optimise {onnx_path.name}: {str(e).splitlines()[0]}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(tmp_src).unlink(missing_ok=True)
    return {"onnxruntime_version": ort.__version__, "graph_optimization_level": "extended"}

"""stdrc: exported inference runtime for ST-DRC (identity-preserving text-to-video on LTX-2).

Stages live in their own subpackages: ``stdrc.export`` (PyTorch model + ONNX export),
``stdrc.engines`` (engines and the bundle), ``stdrc.calibration`` (FP8) and
``stdrc.runtime`` (the lean runtime, no torch on the ONNX Runtime path).
"""

__version__ = "0.1.0"

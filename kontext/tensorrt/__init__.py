"""The TensorRT path: ONNX export (export.py, qdq.py), engine builds and their sidecars (build.py, engine_info.py),
and a runtime behind the denoiser (runtime.py). Only the runtime and the build need `tensorrt`; the export needs
`onnx` and `onnxscript` (the `tensorrt` extra of the package)."""

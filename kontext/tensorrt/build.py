"""`build-engine`: a strongly typed TensorRT engine from an exported graph, with a timing cache and a sidecar.

Each Kontext profile (one or two references, kontext.tensorrt.profiles) becomes an optimisation profile; the
precision is the graph's own (strong typing: the bf16 graph builds bf16 kernels, the Q/DQ weights of an fp8 / fp4
graph quantised kernels where TensorRT has them). The timing cache (in the output folder) makes a
rebuild for another profile or model of the same shapes take minutes, not tens of minutes; there is one per
TensorRT version and GPU (`timing-<version>-<gpu>.cache`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..errors import InputError
from . import engine_info
from .export import read_metadata
from .profiles import Profile, input_shapes

log = logging.getLogger(__name__)

INSTALL = ("the TensorRT backend needs NVIDIA's `tensorrt` Python package, which is not installed here. On a "
           "machine with an NVIDIA GPU: `pip install tensorrt` (TensorRT 10 or newer; fp8 engines need an Ada or "
           "newer GPU, fp4 ones a Blackwell GPU and TensorRT 10.15 or newer), then "
           "`pip install -e \".[tensorrt]\"` for the exporter")
# The fp4 graph (opset 23) holds FLOAT4E2M1 weights (TensorRT 10.8) and the ONNX Attention and RMSNormalization
# ops torch's exporter writes from opset 23 (parsed from TensorRT 10.14 and 10.15, by its changelog).
MIN_VERSION = {"fp4": (10, 15)}


def timing_cache_name(tensorrt_version: str, gpu: str) -> str:
    """One timing cache per TensorRT version and GPU: a folder may hold engines for several, and TensorRT refuses
    (or ignores) a cache made by another."""
    tag = "".join(c if c.isalnum() else "-" for c in f"{tensorrt_version}-{gpu}")
    return f"timing-{tag}.cache"


def check_version(tensorrt_version: str, precision: str) -> None:
    need = MIN_VERSION.get(precision)
    if need is None:
        return
    try:
        have = tuple(int(v) for v in tensorrt_version.split(".")[:2])
    except ValueError:
        return  # an unusual version string: let the parser speak
    if have < need:
        raise InputError(f"a {precision} graph needs TensorRT {'.'.join(map(str, need))} or newer to build "
                         f"(this is {tensorrt_version}); upgrade tensorrt, or export in bf16 or fp8")


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise InputError(INSTALL) from None
    return tensorrt


def gpu_name() -> str:
    import torch

    if not torch.cuda.is_available():
        raise InputError("TensorRT engines are built and run on an NVIDIA GPU; no CUDA device is visible")
    return torch.cuda.get_device_name()


def engine_info_for(onnx_path: str | os.PathLike, tensorrt_version: str, gpu: str,
                    refittable: bool = False) -> engine_info.EngineInfo:
    """The sidecar of an engine built from `onnx_path` (its kontext metadata) for this TensorRT and GPU."""
    meta = read_metadata(onnx_path)
    return engine_info.EngineInfo(
        source_sha256=meta.get("source_sha256", ""), precision=meta["precision"], config=json.loads(meta["config"]),
        profiles=[Profile.from_json(p) for p in json.loads(meta["profiles"])], tensorrt_version=tensorrt_version,
        gpu=gpu, source_name=meta.get("source_name", ""), refittable=refittable,
        extra={**{k: int(meta[k]) for k in ("source_size", "source_mtime_ns") if k in meta},
               **({"loras": json.loads(meta["loras"])} if "loras" in meta else {})})


def build_engine(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, *, refittable: bool = False,
                 workspace_gb: float | None = None, rebuild: bool = False, verbose: bool = False) -> Path:
    """Build (or find in `out_dir`'s cache) the engine of `onnx_path` for this GPU; returns the plan's path."""
    onnx_path, out_dir = Path(onnx_path).expanduser(), Path(out_dir).expanduser()
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: no such ONNX file")
    trt = import_tensorrt()
    info = engine_info_for(onnx_path, trt.__version__, gpu_name(), refittable)
    check_version(trt.__version__, info.precision)
    plan_path = out_dir / f"{info.key()}.plan"
    if plan_path.is_file() and plan_path.with_suffix(".json").is_file() and not rebuild:
        log.info("engine %s is already built for this GPU and TensorRT (pass --rebuild to build it again)",
                 plan_path)
        return plan_path
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse this graph: {errors}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    config = _config(trt, builder, info, refittable, workspace_gb, out_dir, inputs)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise InputError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    path = engine_info.save(info, memoryview(plan), out_dir)  # the plan first: nothing after may lose it
    cache = config.get_timing_cache()
    if cache is not None:
        (out_dir / timing_cache_name(info.tensorrt_version, info.gpu)).write_bytes(memoryview(cache.serialize()))
    log.info("built %s (%.2f GB) in %.0f s", path, path.stat().st_size / 1e9, time.perf_counter() - start)
    return path


def _config(trt, builder, info: engine_info.EngineInfo, refittable: bool, workspace_gb: float | None,
            out_dir: Path, inputs: set[str]):
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache_file = out_dir / timing_cache_name(info.tensorrt_version, info.gpu)
    cache = config.create_timing_cache(cache_file.read_bytes()) if cache_file.is_file() else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if cache is not None:
            log.warning("%s does not fit this TensorRT and GPU: building without it", cache_file)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    model_config = info.flux_config()
    for p in info.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in input_shapes(p, model_config).items():
            if name in inputs:  # a model without guidance embedding has no `guidance` input
                profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    return config

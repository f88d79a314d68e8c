"""The engine behind the denoiser: `EngineDiT` stands where a FluxDiT does (Denoiser, pipeline, the pack's MODEL).

`EngineDiT` is a kontext.backend.DiTBackend: `Denoiser` calls its `token_forward`, which gets the packed tokens, the
text, the timestep, pooled vector and guidance, and the token ids (EngineDiT.positions keeps the ids, as the engine
computes RoPE itself). Its capabilities (kontext.tensorrt.CAPABILITIES) say what it cannot do: LoRA, block patches,
offload, compile. Every call is checked against the engine's profiles first, so a shape it was not built for is refused
with the bounds, never run. Two executors: TensorRT's (CUDA tensors in and out on the current stream) and, for CPU
tests and debugging, onnxruntime on the exported graph, so the runtime's logic is tested where no GPU is.
"""
from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn

from ..dit import PLAIN, BlockRunner
from ..errors import InputError
from ..precision import DENSE
from . import CAPABILITIES, engine_info
from .build import engine_info_for, gpu_name, import_tensorrt
from .export import INPUTS, OUTPUT
from .profiles import choose

log = logging.getLogger(__name__)


class Executor(Protocol):
    inputs: tuple[str, ...]

    def run(self, inputs: dict[str, torch.Tensor], profile: int) -> torch.Tensor: ...


class EngineIds(NamedTuple):
    """What the denoiser's per-run positions hold for an engine: the token ids [1, L, 3] and [1, N, 3]."""
    txt_ids: torch.Tensor
    img_ids: torch.Tensor


class EngineDiT(nn.Module):
    """A built engine as a DiT backend: config, compute dtype, positions() and the token forward the Denoiser uses."""

    capabilities = CAPABILITIES

    def __init__(self, executor: Executor, info: engine_info.EngineInfo, description: str = ""):
        super().__init__()
        self.executor = executor
        self.info = info
        self.config = info.flux_config()
        self.profiles = info.profiles
        self.compute_dtype = DENSE.get(info.precision, torch.bfloat16)  # fp8 / fp4 engines compute in bf16
        self.description = description

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def positions(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> EngineIds:
        return EngineIds(txt_ids.float(), img_ids.float())

    def token_forward(self, img: torch.Tensor, txt: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor,
                      guidance: torch.Tensor | None, pe: EngineIds, blocks: BlockRunner = PLAIN) -> torch.Tensor:
        """The blocks are fused into the engine: `blocks` must be plain (the Denoiser refuses other ones)."""
        B, N = img.shape[:2]
        profile = choose(self.profiles, B, N, txt.shape[1])
        if guidance is None:
            if self.config.guidance_embed:
                raise InputError("this model embeds guidance: pass a guidance value (2.5 is Kontext's default)")
            guidance = torch.zeros_like(timesteps)  # an input of the graph that nothing reads
        values = {"img": img, "img_ids": pe.img_ids.expand(B, -1, -1), "txt": txt,
                  "txt_ids": pe.txt_ids.expand(B, -1, -1), "timesteps": timesteps, "y": y, "guidance": guidance}
        out = self.executor.run({k: values[k] for k in self.executor.inputs}, profile)
        return out.to(img.device)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, pe=None, blocks=PLAIN):
        """BFL's convention, as FluxDiT.forward (ids required; `pe` from positions() replaces them)."""
        if not blocks.is_plain():
            self.capabilities.require("block_patches")
        pe = pe if pe is not None else self.positions(txt_ids, img_ids)
        return self.token_forward(img, txt, timesteps, y, guidance, pe, blocks)

    def extra_repr(self) -> str:
        return f"{self.info.precision} engine {self.description}"


class TensorRTExecutor:
    """A deserialised engine and one execution context on the current CUDA device; tensors in and out on the
    current CUDA stream (a side stream that waits for it, when that is the legacy default stream, on which
    TensorRT would add device-wide synchronisations)."""

    def __init__(self, plan: Path):
        trt = import_tensorrt()
        self.trt = trt
        self.device = torch.device("cuda", torch.cuda.current_device())
        with open(plan, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # no second copy
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        if self.engine is None:
            raise InputError(f"{plan}: TensorRT {trt.__version__} could not load this engine (damaged, or built "
                             "by another TensorRT version); rebuild it")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise InputError(f"{plan}: TensorRT could not make an execution context (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = tuple(n for n in INPUTS if n in names)
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = -1
        self.side = torch.cuda.Stream(self.device)

    def run(self, inputs: dict[str, torch.Tensor], profile: int) -> torch.Tensor:
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            stream = self.side if caller == torch.cuda.default_stream(self.device) else caller
            held = [t.to(self.device, self.dtypes[name]).contiguous() for name, t in inputs.items()]
            if stream is not caller:
                stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                if profile != self.profile:
                    if not self.context.set_optimization_profile_async(profile, stream.cuda_stream):
                        raise RuntimeError(f"TensorRT refused optimisation profile {profile}")
                    self.profile = profile
                for name, t in zip(inputs, held):
                    if not self.context.set_input_shape(name, tuple(t.shape)):
                        raise InputError(f"the engine refuses {name} of shape {list(t.shape)}")
                    self.context.set_tensor_address(name, t.data_ptr())
                out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT)), dtype=self.dtypes[OUTPUT],
                                  device=self.device)
                self.context.set_tensor_address(OUTPUT, out.data_ptr())
                if not self.context.execute_async_v3(stream.cuda_stream):
                    raise RuntimeError("TensorRT could not run the engine (its log above says why)")
            if stream is not caller:  # memory made on one stream and used on the other
                caller.wait_stream(stream)
                for t in held:
                    t.record_stream(stream)
                out.record_stream(caller)
        return out


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64}
    return table[dt]


class OnnxRuntimeExecutor:
    """The exported graph in onnxruntime (CPU): the same calls as an engine, to test and debug the runtime."""

    def __init__(self, path: Path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in self.session.get_inputs()}
        self.inputs = tuple(n for n in INPUTS if n in names)

    def run(self, inputs: dict[str, torch.Tensor], profile: int) -> torch.Tensor:
        feed = {k: v.detach().float().cpu().numpy() for k, v in inputs.items()}
        return torch.from_numpy(self.session.run([OUTPUT], feed)[0])


def load_engine(location: str | os.PathLike, *, source: str | os.PathLike | None = None,
                precision: str | None = None, preferred: str | None = None) -> EngineDiT:
    """The engine in `location` (a .plan, or a folder of engines) that can run on this GPU and TensorRT. With
    `source` (the DiT file), an engine built from another file is refused as stale; `precision` must match when
    given."""
    trt = import_tensorrt()
    plan, info = engine_info.select(location, tensorrt_version=trt.__version__, gpu=gpu_name(), source=source,
                                    precision=precision, preferred=preferred)
    log.info("TensorRT engine %s: %s, profiles %s", plan, info.precision,
             "; ".join(p.describe() for p in info.profiles))
    if info.extra.get("loras"):
        log.warning("TensorRT engine %s has LoRAs merged into it: %s", plan.name,
                    ", ".join(f"{lo['name']} x {lo['strength']:g}" for lo in info.extra["loras"]))
    return EngineDiT(TensorRTExecutor(plan), info, str(plan))


def onnx_engine(path: str | os.PathLike) -> EngineDiT:
    """An exported graph run by onnxruntime as if it were an engine (CPU; for tests and debugging)."""
    path = Path(path).expanduser()
    return EngineDiT(OnnxRuntimeExecutor(path), engine_info_for(path, "onnxruntime", "cpu"), str(path))

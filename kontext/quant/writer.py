"""`quantize`: write a DiT checkpoint in ComfyUI's mixed-precision layout, streaming one tensor at a time.

The output has BFL's key names (as the release file), dense tensors in bf16 (or the input's fp16/fp32), and for every
linear layer of the transformer blocks:
- fp8: `weight` float8_e4m3fn, `weight_scale` a float32 per-tensor scale (ComfyUI's mixed layout has one per tensor);
- fp4: `weight` NVFP4-packed uint8 [N, K/2], `weight_scale` e4m3 block scales (tiled), `weight_scale_2` float32;
- `comfy_quant`: the JSON description `{"format": "float8_e4m3fn" | "nvfp4"}` as a uint8 tensor.
So ComfyUI's own UNETLoader reads it, and so does `kontext.load_dit`.

The safetensors header is computed first from the input's header alone (every output shape and dtype is known),
then each tensor is read, converted and appended: memory stays at about one tensor, not the model. The file is
written beside OUT and renamed at the end, so an interrupted run never leaves a half-written OUT.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..dit_file import DitFile, open_dit
from ..errors import InputError
from ..flux_keys import QUANTIZABLE
from ..formats import QUANTIZED, WeightFormat
from ..weights import Checkpoint, Source
from ..weights.checkpoint import DTYPES
from ..weights.loading import LoadQuantizer, build_tensor, source_shape

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {v: k for k, v in DTYPES.items()}


@dataclass
class Entry:
    """One output tensor: its name, dtype and shape (for the header) and how to make it (for the data)."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


def _comfy_quant(fmt: WeightFormat) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt.comfy_name}).encode("utf-8")), dtype=torch.uint8)


def plan_output(dit: DitFile, fmt: WeightFormat) -> list[Entry]:
    """The output tensors, in file order, from the input's header alone; the blocks' linear layers in `fmt` as
    ComfyUI's mixed files store it (`fmt.for_file()`: fp8 with one scale per tensor)."""
    fmt = fmt.for_file()
    model = dit.meta_model()
    names = [n for n, _ in model.named_parameters()]
    plan, ckpt = dit.plan, dit.ckpt
    dense = _dense_dtype(ckpt)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantizer = LoadQuantizer(ckpt)  # each weight quantised once for all its tensors, which follow one another
    entries: list[Entry] = []
    for name in names:
        src = plan[name]
        stem = name[: -len(".weight")]
        if name.endswith(".weight") and stem in linears and stem.startswith(QUANTIZABLE):
            n, k = source_shape(ckpt, src)
            for leaf, (shape, dtype) in fmt.params(n, k).items():
                assert dtype is not None, "a quantised format stores its tensors in dtypes of its own"
                part = Source(src.keys, src.op, quant=(fmt, leaf))
                entries.append(Entry(f"{stem}.{leaf}", dtype, shape, functools.partial(quantizer.part, part)))
            q = _comfy_quant(fmt)
            entries.append(Entry(f"{stem}.comfy_quant", torch.uint8, tuple(q.shape), lambda q=q: q))
        else:
            entries.append(Entry(name, dense, tuple(source_shape(ckpt, src)),
                                 lambda src=src: build_tensor(ckpt, src).to(dense)))
    return entries


def _dense_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The input's own dense dtype when it is one of bf16/fp16/fp32, else bf16 (the release file's)."""
    dtypes = {ckpt.dtype(k) for k in ckpt.weight_keys() if k not in ckpt.quantized}
    for d in (torch.bfloat16, torch.float16, torch.float32):
        if dtypes == {d}:
            return d
    return torch.bfloat16


def _header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        size = math.prod(e.shape) * torch.empty((), dtype=e.dtype).element_size()
        header[e.name] = {"dtype": SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def quantize_file(src: str | os.PathLike, out: str | os.PathLike, precision: str, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `src` (any DiT layout load_dit reads) as `out` in ComfyUI's mixed layout at `precision` (fp8, fp4)."""
    fmt = QUANTIZED.get(precision)
    if fmt is None:
        raise InputError(f"precision must be one of {', '.join(QUANTIZED)}, got {precision!r}")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    dit = open_dit(src)
    ckpt = dit.ckpt
    if ckpt.quantized:
        log.warning("%s is already quantised: its weights are dequantised and quantised again (lossy twice)",
                    ckpt.path.name)
    entries = plan_output(dit, fmt)
    metadata = {"format": "pt", "kontext_quantized": precision}
    if "kontext_config" in ckpt.metadata:
        metadata["kontext_config"] = ckpt.metadata["kontext_config"]
    partial = out.with_name(f".{out.name}.partial")
    try:
        with open(partial, "wb") as fh:
            fh.write(_header(entries, metadata))
            for i, e in enumerate(entries):
                t = e.make().contiguous()
                if t.dtype != e.dtype or tuple(t.shape) != e.shape:  # a bug, not user input: fail loudly
                    raise RuntimeError(f"{e.name}: made {t.dtype} {list(t.shape)}, planned {e.dtype} {list(e.shape)}")
                fh.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                if progress is not None:
                    progress(i, len(entries))
        partial.replace(out)
    except PermissionError:
        raise InputError(f"cannot write to {out.parent} (permission denied)") from None
    finally:
        if partial.exists():
            partial.unlink()
    log.info("wrote %s (%s, %d tensors)", out, precision, len(entries))
    return out

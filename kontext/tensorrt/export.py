"""ONNX export of the DiT through the denoiser seam: BFL's tensors in, every image token's prediction out.

The graph is the function `kontext.denoiser.Denoiser` calls per step: inputs `img` [B, N, 64] (target, then reference
tokens), `img_ids` [B, N, 3], `txt` [B, L, 4096], `txt_ids` [B, L, 3], `timesteps` [B], `y` [B, 768],
`guidance` [B], all float32; output `pred` [B, N, 64] float32. N, L (512 here, 256 and up in ComfyUI) and B are
dynamic (kontext.tensorrt.profiles).
Nothing float64 is left in it: the RoPE angles are ids x frequencies in float32, the frequencies computed in float64
at export and stored rounded (the angles differ from the float64 ones by about 1e-5 rad at the largest ids, far
under bf16's resolution). Quantised layers become DequantizeLinear nodes on their stored weights
(kontext.tensorrt.qdq); the rest runs in the model's compute dtype.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..dit import FluxDiT
from ..errors import InputError
from ..formats import WeightFormat, layer_format
from ..module_tree import copy_path, shallow_copy
from ..precision import dense_name
from ..rope import Positions
from . import qdq
from .profiles import TEXT_TOKENS, Profile, kontext_profiles, token_range

log = logging.getLogger(__name__)

INPUTS = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")
OUTPUT = "pred"
# Dense and fp8 graphs use opset 21 (float8 DequantizeLinear needs 19, widely parsed by TensorRT); a format whose
# export step needs more says so (WeightFormat.export_opset: NVFP4's FLOAT4E2M1 needs 23).
DEFAULT_OPSET = 21
EXTERNAL_DATA_BYTES = 2**31 - 2**27  # a protobuf holds under 2 GiB: past ~1.9 GB the weights go beside the graph
META_PREFIX = "kontext."


def rope_tables(config) -> tuple[torch.Tensor, torch.Tensor]:
    """(frequencies float32 [head_dim/2], axis of each int64 [head_dim/2]) for ids x frequencies in the graph."""
    freqs, axes = [], []
    for axis, dim in enumerate(config.axes_dim):
        scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        freqs.append((1.0 / config.theta**scale).float())
        axes.append(torch.full((dim // 2,), axis, dtype=torch.int64))
    return torch.cat(freqs), torch.cat(axes)


class ExportedDiT(nn.Module):
    """The DiT with BFL's inputs and float32 output; quantised layers stood in for by kontext.tensorrt.qdq's."""

    def __init__(self, dit: FluxDiT):
        super().__init__()
        self.dit = _with_qdq(dit)
        freqs, axes = rope_tables(dit.config)
        self.register_buffer("freqs", freqs, persistent=False)
        self.register_buffer("axes", axes, persistent=False)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        ids = torch.cat((txt_ids, img_ids), dim=1)  # [B, L+N, 3]
        angles = (ids[..., self.axes] * self.freqs)[:, None]  # [B, 1, L+N, head_dim/2] float32
        pe = Positions(angles.cos(), angles.sin())
        g = guidance if self.dit.guidance_in is not None else None
        return FluxDiT.forward(self.dit, img, None, txt, None, timesteps, y, g, pe=pe).float()


def _with_qdq(dit: FluxDiT) -> FluxDiT:
    """A copy of the module tree (tensors shared) with each quantised layer replaced by its Q/DQ stand-in."""
    root = shallow_copy(dit)
    for name in qdq.quantised_layers(dit):
        w = dit.get_submodule(name).weight
        if w.dtype == torch.float8_e5m2:
            raise InputError(f"{name}: float8_e5m2 weights, and TensorRT's fp8 is e4m3 only; export with "
                             "--precision bf16, or write an e4m3 file first (`python -m kontext quantize "
                             "--precision fp8`)")
        parent_name, _, leaf = name.rpartition(".")
        parent = copy_path(root, parent_name) if parent_name else root
        parent._modules[leaf] = qdq.QdqLinear(dit.get_submodule(name))
    return root


@dataclass
class Exported:
    path: Path
    data_path: Path | None  # the external weights file, when there is one
    bytes: int  # graph + weights on disk
    seconds: float
    opset: int
    precision: str


def example_inputs(dit: FluxDiT, tokens: int, batch: int = 2, text: int = TEXT_TOKENS) -> tuple[torch.Tensor, ...]:
    """Tracing inputs; batch 2, as torch.export would fix an axis of size 1 to 1."""
    c = dit.config
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, tokens, c.in_channels, generator=g), torch.zeros(batch, tokens, 3),
            torch.randn(batch, text, c.context_in_dim, generator=g), torch.zeros(batch, text, 3),
            torch.full((batch,), 0.5), torch.randn(batch, c.vec_in_dim, generator=g), torch.full((batch,), 2.5))


def quantized_format(dit: FluxDiT) -> WeightFormat | None:
    """The one quantised format of the DiT's layers (None: dense); a DiT mixing formats is refused."""
    fmts = {f for m in dit.modules() if (f := layer_format(m)) is not None and f.quantized}
    if len(fmts) > 1:
        raise InputError(f"a DiT mixing {sorted(f.name for f in fmts)} layers cannot be exported as one precision")
    return fmts.pop() if fmts else None


def precision_of(dit: FluxDiT) -> str:
    fmt = quantized_format(dit)
    return fmt.name if fmt is not None else dense_name(dit.compute_dtype)


def export_onnx(dit: FluxDiT, out: str | os.PathLike, *, profiles: list[Profile] | None = None,
                source: str | os.PathLike | None = None, loras: Sequence[tuple] = (),
                overwrite: bool = False) -> Exported:
    """Write the DiT's ONNX graph to `out` (weights to `out` + ".data" past 2 GB), with its precision, config,
    profiles and `source` (the DiT file it was loaded from: its SHA-256, name, size, time) in the metadata for
    `build-engine`. `loras` [(file, strength)] names the LoRAs merged into `dit`, for the record (an engine with
    LoRAs baked in is told apart from the plain one). `out` is never overwritten unless asked, and appears only
    once completely written."""
    out = Path(out).expanduser()
    data = out.with_name(out.name + ".data")
    check_output(out, data, overwrite)
    profiles = profiles or kontext_profiles()
    precision = precision_of(dit)
    fmt = quantized_format(dit)
    opset = (fmt.export_opset if fmt is not None else None) or DEFAULT_OPSET
    lo, hi = token_range(profiles)
    text_lo, text_hi = token_range(profiles, "text")
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max(2, token_range(profiles, "batch")[1]))
    tokens, text = Dim("tokens", min=lo, max=hi), Dim("text", min=text_lo, max=text_hi)
    per_batch = {0: batch}
    shapes = {"img": {0: batch, 1: tokens}, "img_ids": {0: batch, 1: tokens}, "txt": {0: batch, 1: text},
              "txt_ids": {0: batch, 1: text}, "timesteps": per_batch, "y": per_batch, "guidance": per_batch}
    model = ExportedDiT(dit).eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    start = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad(), _quiet():
        example = example_inputs(dit, (lo + hi) // 2, 2, (text_lo + text_hi) // 2)
        program = torch.onnx.export(model, example, None, input_names=list(INPUTS), output_names=[OUTPUT],
                                    dynamic_shapes=shapes, dynamo=True, opset_version=opset,
                                    custom_translation_table=qdq.translations(opset), verbose=False)
    program.model.metadata_props.update(metadata(dit, precision, profiles, source, opset, loras))
    _save(program, out, data, external)
    seconds = time.perf_counter() - start
    size = out.stat().st_size + (data.stat().st_size if external else 0)
    log.info("exported the %s DiT to %s (%.2f GB, opset %d) in %.0f s", precision, out, size / 1e9, opset, seconds)
    return Exported(out, data if external else None, size, seconds, opset, precision)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress lines and its notes on things this graph does not use (torchvision ops, axis
    renames) are noise to a user: kept out of the console unless -v asks for INFO logs."""
    names = ("torch.onnx", "torch.export", "onnx_ir", "onnxscript")
    levels = {n: logging.getLogger(n).level for n in names}
    quiet = not log.isEnabledFor(logging.INFO)
    try:
        for n in names:
            if quiet:
                logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def check_output(out: Path, data: Path, overwrite: bool) -> None:
    if not out.parent.is_dir():
        raise InputError(f"{out}: its folder does not exist")
    for p in (out, data):
        if p.exists() and not overwrite:
            raise InputError(f"{p} exists; pass --overwrite (overwrite=True) to replace it")


def metadata(dit: FluxDiT, precision: str, profiles: list[Profile], source: str | os.PathLike | None,
             opset: int, loras: Sequence[tuple] = ()) -> dict:
    from .. import __version__
    from .engine_info import file_sha256, source_identity

    meta = {"precision": precision, "config": dit.config.to_json(), "opset": str(opset), "version": __version__,
            "profiles": json.dumps([p.to_json() for p in profiles]), "inputs": ",".join(INPUTS), "output": OUTPUT}
    if source is not None:
        meta["source_sha256"] = file_sha256(source)
        meta.update({k: str(v) for k, v in source_identity(source).items()})
    if loras:
        meta["loras"] = json.dumps([{"name": os.path.basename(p), "sha256": file_sha256(p), "strength": float(w)}
                                    for p, w in loras])
    return {META_PREFIX + k: v for k, v in meta.items()}


def read_metadata(path: str | os.PathLike) -> dict:
    """The kontext.* metadata of an exported graph (without loading its weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    if "precision" not in meta or "profiles" not in meta:
        raise InputError(f"{path}: not an ONNX graph written by `python -m kontext export-onnx` (no kontext "
                         "metadata); export it with that command")
    return meta


def _save(program, out: Path, data: Path, external: bool) -> None:
    """Save into a temporary folder beside `out`, then move into place (the graph names its weights file by its
    base name, so moving both keeps the link)."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_out = Path(tmp) / out.name
        program.save(tmp_out, external_data=external)
        if external:
            os.replace(tmp_out.with_name(data.name), data)
        elif data.exists():  # an overwritten export's weights, which nothing refers to any more
            data.unlink()
        os.replace(tmp_out, out)

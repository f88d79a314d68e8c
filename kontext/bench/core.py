"""Time the DiT at each precision and memory mode on random weights, against diffusers' and ComfyUI's Flux in the
same process.

Every model is built directly on the device from seeded generators (no download, no file): parameter i of the DiT
is drawn from its own generator, so each path sees the same numbers and no path needs a full fp32 copy beside it.
Per path and mode (kontext.bench.modes: resident, stream, compiled): one denoising step (median of `repeat`
`Denoiser` calls after `warmup`, CUDA events on a GPU), the warm-up (first call minus that), a whole edit's sampling
loop (`sample_latent`, random conditioning, no VAE or text encoders), peak GPU memory, the weight bytes the device
holds for the whole run, and how far the velocity is from the resident mode's. Peers get the dense weights and the
same inputs; their ratios are peer / ours (> 1: we are faster).
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import FluxConfig
from ..dit import FluxDiT
from ..errors import InputError
from ..flux_loader import quantized_formats
from ..formats import QUANTIZED, WeightFormat, layer_format
from ..ids import image_ids, text_ids
from ..latents import to_model_space
from ..offload import BLOCK_LISTS
from ..ops import set_formats
from ..weights.loading import set_parameter

SIZES = {"full": (FluxConfig.kontext_dev, 1024, 28), "tiny": (FluxConfig.tiny, 256, 4)}  # config, res, steps
PATHS = ("bf16", "fp8", "fp4")
TEXT_TOKENS = 512
SIGMA, GUIDANCE = 0.7, 2.5


@dataclass
class Setup:
    config: FluxConfig
    device: torch.device
    res: int
    steps: int
    warmup: int
    repeat: int
    seed: int = 0
    memory_limit_gb: float | None = None  # cap of PyTorch's CUDA allocator, in GiB: a smaller card emulated
    cuda_graphs: bool = False  # the compiled mode records CUDA graphs (mode "reduce-overhead")
    step_only: bool = False  # no whole edit: the small-card checks need the step's memory, not 28 more steps

    @property
    def dense(self) -> torch.dtype:
        # bf16 is the GPU's dense path; on the CPU bf16 matmuls are slow and nobody runs them: fp32 instead.
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @property
    def latent(self) -> int:
        return self.res // 8


@dataclass
class Inputs:
    z: torch.Tensor  # model-space target latent [1, 16, h, w], float32
    ref: torch.Tensor  # raw reference latent [1, 16, h, w], float32
    txt: torch.Tensor  # [1, 512, context_in_dim]
    pooled: torch.Tensor  # [1, vec_in_dim]


@dataclass
class Peer:
    name: str
    ms: float | None = None
    dtype: str | None = None
    note: str | None = None  # why it did not run


@dataclass
class Row:
    mode: str
    path: str
    ms_step: float | None = None
    s_edit: float | None = None  # the whole edit, seconds
    warmup_s: float | None = None  # first call minus the steady-state step: compiling, kernel choice, first fetch
    peak_bytes: int | None = None
    weight_bytes: int | None = None  # held on the device for the whole run (streamed blocks only visit)
    dv: float | None = None  # max |v - v_resident| / max |v_resident|, same path and inputs
    ratios: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    note: str | None = None  # how to read the row (a CPU stand-in, CUDA graphs)


# ---------------------------------------------------------------------------------------------- weights

def draw(shape: tuple[int, ...], name: str, index: int, s: Setup) -> torch.Tensor:
    """The fp32 value of parameter `name` (number `index`), the same on every call and for every path."""
    g = torch.Generator(device=s.device).manual_seed(s.seed * 1_000_003 + index)
    t = torch.randn(shape, generator=g, device=s.device)
    if name.endswith(".scale"):  # RMSNorm gains around 1
        return t.mul_(0.1).add_(1.0)
    if name.endswith(".bias"):
        return t.mul_(0.02)
    return t.div_(math.sqrt(shape[1]))  # 1/sqrt(fan_in): activations keep their size through the layers


def quantized_tensors(w: torch.Tensor, fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """A layer's stored tensors for the fp32 weight w, by the recipe the loader quantises on load with."""
    return fmt.quantize(w)


def build(s: Setup, path: str, blocks_on: torch.device | None = None) -> FluxDiT:
    """The DiT for one path, built on `meta` (quantised layers swapped in there by `set_formats`, as the loader
    does), then materialised parameter by parameter on the device. With `blocks_on` the blocks' parameters move
    there as they are drawn (the streaming mode's CPU home), so the device never holds more than one of them."""
    def home(name: str, t: torch.Tensor) -> torch.Tensor:
        if blocks_on is None or name.split(".")[0] not in BLOCK_LISTS:
            return t
        # From the GPU straight into pinned memory (offload.prepare keeps pinned tensors as they are): one copy at
        # DMA speed instead of a pageable one and a second into pinned pages, 24 GB each at full size in bf16.
        return torch.empty(t.shape, dtype=t.dtype, device=blocks_on, pin_memory=t.is_cuda).copy_(t)

    with torch.device("meta"):
        shapes = FluxDiT(s.config)
        model = FluxDiT(s.config, dtype=s.dense)
    index = {n: (i, tuple(p.shape)) for i, (n, p) in enumerate(shapes.named_parameters())}
    fmt = QUANTIZED.get(path)
    if fmt is not None:
        set_formats(model, quantized_formats(model, fmt))
    for name, module in model.named_modules():
        layer_fmt = layer_format(module)
        if layer_fmt is not None and layer_fmt.quantized:
            w = draw(index[f"{name}.weight"][1], f"{name}.weight", index[f"{name}.weight"][0], s)
            for leaf, t in quantized_tensors(w, layer_fmt).items():
                set_parameter(model, f"{name}.{leaf}", home(name, t))
    for name, p in list(model.named_parameters()):
        if p.is_meta:  # dense weights and biases, the quantised layers' biases too
            set_parameter(model, name, home(name, draw(index[name][1], name, index[name][0], s).to(s.dense)))
    return model.eval()


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def make_inputs(s: Setup) -> Inputs:
    g = torch.Generator(device=s.device).manual_seed(10_000 + s.seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=s.device)
    n = s.latent
    return Inputs(rnd(1, 16, n, n), rnd(1, 16, n, n), rnd(1, TEXT_TOKENS, s.config.context_in_dim),
                  rnd(1, s.config.vec_in_dim))


# ---------------------------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], s: Setup) -> float:
    """Median milliseconds of `repeat` calls after `warmup` untimed ones; CUDA events on a GPU (no host gaps)."""
    for _ in range(s.warmup):
        fn()
    if s.device.type == "cuda":
        sync(s.device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(s.repeat)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync(s.device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(s.repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def timed_once(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Milliseconds of one call, host clock around device syncs (a first call's compiling is on the host), and
    its result."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t) * 1000, out


def reset_memory(device: torch.device) -> None:
    gc.collect()  # a freed model of the previous path must not count in this one's peak
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        # Pinned host blocks of a streamed model stay cached after it is freed (tens of GB at full size); torch
        # has no public call to give them back, only this private one (CUDA builds, 2.5 and later).
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


def dense_name(s: Setup) -> str:
    return "bf16" if s.dense == torch.bfloat16 else "fp32"


def path_name(s: Setup, path: str) -> str:
    """The path as its row names it: the dense path is fp32 on the CPU."""
    return dense_name(s) if path == "bf16" else path


# ---------------------------------------------------------------------------------------------- peers

@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build a peer directly in `dtype`: a 12B model made in fp32 first would need 48 GB more."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def dense_state(s: Setup) -> dict[str, torch.Tensor]:
    """Our dense weights under BFL names, what every peer starts from."""
    return build(s, "bf16").state_dict()


@torch.no_grad()
def time_diffusers(s: Setup, x: Inputs) -> Peer:
    from diffusers import FluxTransformer2DModel

    from ..tiny import diffusers_state

    c = s.config
    with torch.device(s.device), default_dtype(s.dense):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=c.in_channels, num_layers=c.depth, num_single_layers=c.depth_single_blocks,
            attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.context_in_dim,
            pooled_projection_dim=c.vec_in_dim, guidance_embeds=c.guidance_embed, axes_dims_rope=c.axes_dim)
    model.load_state_dict(diffusers_state(dense_state(s), c))
    model.eval()
    gc.collect()
    # Its inputs as our denoiser builds them: target then reference tokens, in the dense dtype.
    img = torch.cat([tokens_of(x.z), tokens_of(to_model_space(x.ref))], dim=1).to(s.dense)
    grid = (s.latent, s.latent)
    ids, tids = image_ids(grid, [grid])[0].to(s.device), text_ids(TEXT_TOKENS)[0].to(s.device)
    t, g = torch.full((1,), SIGMA, device=s.device), torch.full((1,), GUIDANCE, device=s.device)
    call = lambda: model(hidden_states=img, encoder_hidden_states=x.txt.to(s.dense), timestep=t, img_ids=ids,
                         pooled_projections=x.pooled.to(s.dense), txt_ids=tids, guidance=g, return_dict=False)
    return Peer("diffusers", median_ms(call, s), dense_name(s))


def tokens_of(z: torch.Tensor) -> torch.Tensor:
    from ..sampling import pack, pad_to_patches

    return pack(pad_to_patches(z))


@torch.no_grad()
def time_comfyui(s: Setup, x: Inputs, comfy_dir: Path) -> Peer:
    if not (comfy_dir / "comfy" / "ldm" / "flux" / "model.py").is_file():
        raise FileNotFoundError(f"{comfy_dir} is not a ComfyUI tree (no comfy/ldm/flux/model.py)")
    sys.path.insert(0, str(comfy_dir))
    try:
        import comfy.cli_args  # with argument parsing off (the default when imported): its defaults, not our argv

        # Its device probe runs at import and assumes CUDA unless told: say --cpu before it runs.
        comfy.cli_args.args.cpu = comfy.cli_args.args.cpu or s.device.type == "cpu"
        import comfy.ops
        from comfy.ldm.flux.model import Flux
    finally:
        sys.path.remove(str(comfy_dir))
    c = s.config
    model = Flux(dtype=s.dense, device=s.device, operations=comfy.ops.disable_weight_init,
                 in_channels=c.in_channels // 4, out_channels=c.out_channels // 4, vec_in_dim=c.vec_in_dim,
                 context_in_dim=c.context_in_dim, hidden_size=c.hidden_size, mlp_ratio=c.mlp_ratio,
                 num_heads=c.num_heads, depth=c.depth, depth_single_blocks=c.depth_single_blocks,
                 axes_dim=list(c.axes_dim), theta=c.theta, patch_size=2, qkv_bias=c.qkv_bias,
                 guidance_embed=c.guidance_embed, txt_ids_dims=[])
    model.load_state_dict(dense_state(s), strict=True)  # BFL names: ComfyUI's own
    model.eval()
    gc.collect()
    # ComfyUI's model gets model-space latents, in its dtype (its model_base casts them before the call).
    z, ref = x.z.to(s.dense), to_model_space(x.ref).to(s.dense)
    t, g = torch.full((1,), SIGMA, device=s.device), torch.full((1,), GUIDANCE, device=s.device)
    call = lambda: model(z, t, x.txt.to(s.dense), y=x.pooled.to(s.dense), guidance=g, ref_latents=[ref])
    return Peer("comfyui", median_ms(call, s), dense_name(s))


# ---------------------------------------------------------------------------------------------- entry

def meta(s: Setup, size_name: str, modes: list[str]) -> dict:
    n = (s.latent // 2) ** 2
    out = {"torch": torch.__version__, "device": str(s.device), "size": size_name, "res": s.res,
           "steps": None if s.step_only else s.steps, "warmup": s.warmup, "repeat": s.repeat,
           "tokens": {"target": n, "reference": n, "text": TEXT_TOKENS}, "config": json.loads(s.config.to_json()),
           "modes": modes, "memory_limit_gb": s.memory_limit_gb, "cuda_graphs": s.cuda_graphs}
    if s.device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(s.device)
        out["gpu_bytes"] = torch.cuda.get_device_properties(s.device).total_memory
    return out


def check_paths(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise InputError(f"--paths {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
                         f"expected some of {', '.join(PATHS)}")
    return list(dict.fromkeys(paths))


def check_res(res: int) -> None:
    if res < 16 or res % 16:
        raise InputError(f"--res {res}: the edit size must be a positive multiple of 16 pixels (e.g. 256, 1024)")

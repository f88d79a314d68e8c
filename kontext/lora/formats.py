"""Reading a FLUX.1 LoRA file of any common layout into one list of patches on our (BFL-named) DiT parameters.

Layouts ComfyUI v0.8 maps for Flux (comfy/lora.py `model_lora_keys_unet`, comfy/lora_convert.py), read as it reads
them: BFL names under `diffusion_model.` (ComfyUI, OneTrainer) and their `linear1_qkv` slice, kohya's `lora_unet_`,
diffusers names under `transformer.` (ai-toolkit, diffusers), `lycoris_` (SimpleTuner) and `lora_transformer_`
(OneTrainer). Also read, being unambiguous though ComfyUI skips them: bare BFL or diffusers names,
`model.diffusion_model.`, fal's Kontext trainer (`base_model.model.` + BFL names, as diffusers reads it), raw PEFT
saves (`base_model.model.` + diffusers names) and XLabs' `processor.qkv_lora1` names (as ComfyUI maps full files).
A layer has up/down in any spelling ComfyUI accepts, `.alpha` (none: scale 1), `.dora_scale`, `.diff` (full delta),
`.diff_b` (bias delta; PEFT's `lora_B.bias` too). LoKr, LoHa, OFT/BOFT, GLoRA, PEFT DoRA are refused by name.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from ..config import FluxConfig
from ..errors import CheckpointError
from ..flux_keys import detect, diffusers_layers
from ..weights import Checkpoint


@dataclass
class LoraPatch:
    """One change to one parameter: a low-rank product (kind "lora") or a full delta (kind "diff") on its rows
    `rows` (a slice of dim 0, for the q / k / v / MLP parts of fused layers) or on all of it (None)."""
    target: str  # our parameter, "<layer>.weight" or "<layer>.bias"
    rows: tuple[int, int] | None
    kind: str  # "lora" | "diff"
    up: torch.Tensor | None = None  # [out, r], as stored (any float dtype)
    down: torch.Tensor | None = None  # [r, in]
    alpha: float | None = None  # scale alpha / r; None: scale 1
    dora_scale: torch.Tensor | None = None  # [out, 1] (on the output axis) or [1, in], as ComfyUI's weight_decompose
    diff: torch.Tensor | None = None  # kind "diff": the delta, shaped as the (sliced) parameter
    source_keys: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0] if self.alpha is not None else 1.0


@dataclass
class LoraFile:
    path: Path
    format: str  # "comfyui", "kohya", "diffusers", ...; several joined by "+" when a file mixes naming schemes
    patches: list[LoraPatch]
    unmatched: list[str]  # keys that patch no parameter of this model (text-encoder parts, norms, unknown names)
    notes: list[str] = field(default_factory=list)  # what a user may want to know (e.g. an alpha ComfyUI ignores)


@dataclass(frozen=True)
class Slot:
    """Where one LoRA layer name lands: our layer, the rows of its output, and whether diffusers' (scale, shift)
    halves must be swapped to BFL's (shift, scale) (ComfyUI passes `swap_scale_shift` as the patch function)."""
    layer: str
    rows: tuple[int, int] | None
    swap: bool
    family: str
    leaf: str = "weight"  # "bias": ComfyUI's generic name of a bias itself, which only takes a `.diff`


# ---- layer names ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _param_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    """Our parameters and their shapes, as the DiT itself has them (built on `meta`: nothing is allocated)."""
    from ..dit import FluxDiT

    with torch.device("meta"):
        model = FluxDiT(FluxConfig(**json.loads(config_json)))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def param_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    return _param_shapes(config.to_json())


def _xlabs_names(cfg: FluxConfig) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """XLabs' attention-processor LoRAs, mapped as comfy.lora_convert.convert_uso_lora maps them."""
    out: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for i in range(cfg.depth):
        d = f"double_blocks.{i}"
        for xl, ours in (("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"),
                         ("proj_lora1", "img_attn.proj"), ("proj_lora2", "txt_attn.proj")):
            out[f"{d}.processor.{xl}"] = (f"{d}.{ours}", None)
    for i in range(cfg.depth_single_blocks):
        s = f"single_blocks.{i}"
        out[f"{s}.processor.qkv_lora"] = (f"{s}.linear1", (0, 3 * cfg.hidden_size))
        out[f"{s}.processor.proj_lora"] = (f"{s}.linear2", None)
    return out


BFL_PREFIXES = {"diffusion_model.": "comfyui", "": "bfl", "model.diffusion_model.": "bfl", "base_model.model.": "fal"}
DIFFUSERS_PREFIXES = {"transformer.": "diffusers", "": "diffusers", "base_model.model.": "peft"}


@lru_cache(maxsize=8)
def _key_map(config_json: str) -> dict[str, Slot]:
    cfg = FluxConfig(**json.loads(config_json))
    layers = [k[: -len(".weight")] for k, s in _param_shapes(config_json).items()
              if k.endswith(".weight") and len(s) == 2]
    out: dict[str, Slot] = {}

    def put(name: str, slot: Slot) -> None:
        if out.setdefault(name, slot) != slot:  # a layout's names must never be read two ways
            raise RuntimeError(f"LoRA name {name!r} maps to both {out[name]} and {slot}")

    for layer in layers:
        for prefix, family in BFL_PREFIXES.items():
            put(prefix + layer, Slot(layer, None, False, family))
        put("lora_unet_" + layer.replace(".", "_"), Slot(layer, None, False, "kohya"))
        put(f"diffusion_model.{layer}.bias", Slot(layer, None, False, "comfyui", "bias"))
        if layer.endswith(".linear1"):  # ComfyUI's name for the q, k, v rows of a single block's linear1
            put(f"diffusion_model.{layer}_qkv", Slot(layer, (0, 3 * cfg.hidden_size), False, "comfyui"))
    for name, (layer, rows, swap) in diffusers_layers(cfg).items():
        for prefix, family in DIFFUSERS_PREFIXES.items():
            put(prefix + name, Slot(layer, rows, swap, family))
        put("lycoris_" + name.replace(".", "_"), Slot(layer, rows, swap, "lycoris"))
        put("lora_transformer_" + name.replace(".", "_"), Slot(layer, rows, swap, "onetrainer"))
    for name, (layer, rows) in _xlabs_names(cfg).items():
        for prefix in ("", "diffusion_model."):
            put(prefix + name, Slot(layer, rows, False, "xlabs"))
    return out


def key_map(config: FluxConfig) -> dict[str, Slot]:
    """Every LoRA layer name this reader understands for a model of `config` -> where it lands."""
    return _key_map(config.to_json())


# ---- key parts --------------------------------------------------------------------------------------------------

# (suffix, part) in the order ComfyUI's LoRA adapter looks for them; the first one whose stem is a known layer wins.
SUFFIXES = (
    (".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_mid.weight", "mid"),
    ("_lora.up.weight", "up"), ("_lora.down.weight", "down"),
    (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"),
    (".lora_B", "up"), (".lora_A", "down"),
    (".lora_linear_layer.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
    (".lora_B.default.weight", "up"), (".lora_A.default.weight", "down"),
    (".lora_B.bias", "diff_b"),  # PEFT's lora_bias: a bias delta, as ComfyUI converts BFL's control LoRAs
    (".alpha", "alpha"), (".dora_scale", "dora_scale"), (".diff", "diff"), (".diff_b", "diff_b"),
)
XLABS_SUFFIXES = ((".up.weight", "up"), (".down.weight", "down"))
LORA_MARKERS = tuple(s for s, _ in SUFFIXES + XLABS_SUFFIXES) + (".lora_A.bias", ".set_weight", ".w_norm", ".b_norm")


def split_key(key: str, slots: dict[str, Slot]) -> tuple[str, str] | None:
    """(layer name, part) of a file key, or None if it names no layer of this model."""
    for suffix, part in SUFFIXES + XLABS_SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            slot = slots.get(stem)
            if slot is not None and ((suffix, part) in XLABS_SUFFIXES) == (slot.family == "xlabs"):
                return stem, part
    return None


# ---- other model kinds ------------------------------------------------------------------------------------------

REFUSED_ADAPTERS = {"LoKr": (".lokr_w1", ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a"), "LoHa": (".hada_w1_a", ".hada_w2_a"),
                    "OFT / BOFT": (".oft_blocks",), "GLoRA": (".a1.weight",),
                    "PEFT DoRA (lora_magnitude_vector)": (".lora_magnitude_vector", ".lora_magnitude_vector.weight")}
SD_UNET = re.compile(r"^(lora_unet_|unet\.|(model\.)?diffusion_model\.|lycoris_)?"
                     r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]")
TEXT_ENCODER = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                "text_encoders.", "lora_clip_", "lora_t5_", "te1.", "te2.")
FLUX2 = re.compile(r"(double_stream_modulation_|single_stream_modulation|time_guidance_embed|to_qkv_mlp_proj|"
                   r"ff(_context)?\.linear_(in|out))")
QWEN = re.compile(r"transformer_blocks[._]\d+[._](img_mlp|txt_mlp|img_mod|txt_mod)[._]")
BLOCK = re.compile(r"(?<![a-z])(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks)[._](\d+)[._]")


def refuse_foreign(path: Path, keys: list[str]) -> None:
    """A clear error for a file that is a LoRA of another kind or for another model."""
    for name, suffixes in REFUSED_ADAPTERS.items():
        hit = next((k for k in keys if k.endswith(suffixes)), None)
        if hit is not None:
            raise CheckpointError(path, f"{name} LoRAs are not supported yet (keys such as '{hit}')",
                                  "a LoRA of low-rank up/down pairs, DoRA scales or full deltas")
    if any(k.endswith("img_in.lora_A.weight") for k in keys) and any(k.endswith("norm.key_norm.scale") for k in keys):
        raise CheckpointError(path, "is a FLUX.1 Depth/Canny control LoRA (it widens img_in and sets norm scales), "
                                    "made for FLUX.1 [dev] Depth/Canny, not Kontext")
    for pattern, kind in ((FLUX2, "FLUX.2"), (QWEN, "Qwen-Image")):
        hit = next((k for k in keys if pattern.search(k)), None)
        if hit is not None:
            raise CheckpointError(path, f"is a {kind} LoRA (keys such as '{hit}'), not a FLUX.1 one")


def refuse_deeper(path: Path, keys: list[str], cfg: FluxConfig) -> None:
    """A key naming a block this model does not have: the LoRA is for a deeper model (another kind or size)."""
    depth = {"double_blocks": cfg.depth, "transformer_blocks": cfg.depth,
             "single_blocks": cfg.depth_single_blocks, "single_transformer_blocks": cfg.depth_single_blocks}
    for k in keys:
        m = BLOCK.search(k)
        if m and int(m[2]) >= depth[m[1]]:
            raise CheckpointError(path, f"'{k}' patches {m[1]} {m[2]}, but this model has {depth[m[1]]} of them: a "
                                        "LoRA for a model of another size or kind")


def describe_unknown(path: Path, keys: list[str]) -> CheckpointError:
    """Why no key of the file patches the DiT: another model kind, no LoRA at all, or an unknown layout."""
    sd = next((k for k in keys if SD_UNET.match(k)), None)
    if sd is not None:
        kind = "an SDXL" if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys) else \
            "a Stable Diffusion (1.x / 2.x / XL)"
        return CheckpointError(path, f"is {kind} UNet LoRA (keys such as '{sd}'), not a FLUX.1 one")
    if all(k.startswith(TEXT_ENCODER) for k in keys):
        return CheckpointError(path, f"is a text-encoder-only LoRA (keys such as '{keys[0]}'): it has nothing for "
                                     "the diffusion model, which is all this reader patches")
    examples = ", ".join(f"'{k}'" for k in keys[:4])
    if not any(k.endswith(LORA_MARKERS) for k in keys):
        what = "a full FLUX.1 DiT checkpoint" if detect(keys) else "no LoRA tensors"
        return CheckpointError(path, f"holds {what}, not a LoRA ({len(keys)} keys such as {examples})",
                               "lora_up/lora_down, lora_A/lora_B, .diff keys")
    return CheckpointError(path, f"is a LoRA of an unknown layout: none of its {len(keys)} keys names a layer of "
                                 f"this FLUX.1 model (keys such as {examples})",
                           "ComfyUI, kohya, diffusers/PEFT, XLabs or fal Kontext names")


# ---- reading ----------------------------------------------------------------------------------------------------

def read_lora(path: str | Path, config: FluxConfig) -> LoraFile:
    """The patches of a LoRA file on a DiT of `config`; its layout is read off the keys, its shapes checked."""
    ckpt = Checkpoint(path)  # safetensors only: pickle files are refused by name, damaged files by what is wrong
    keys = ckpt.keys()
    refuse_foreign(ckpt.path, keys)
    slots = key_map(config)
    groups: dict[str, dict[str, str]] = {}
    unmatched: list[str] = []
    for key in keys:
        hit = split_key(key, slots)
        if hit is None:
            unmatched.append(key)
            continue
        stem, part = hit
        parts = groups.setdefault(stem, {})
        if part in parts:
            raise CheckpointError(ckpt.path, f"'{parts[part]}' and '{key}' are both the {part} of layer {stem}")
        parts[part] = key
    shapes = param_shapes(config)
    patches: list[LoraPatch] = []
    families: set[str] = set()
    for stem, parts in groups.items():
        new, unused = _layer_patches(ckpt, stem, slots[stem], parts, shapes)
        patches += new
        unmatched += unused
        families |= {slots[stem].family} if new else set()
    if not patches:
        raise describe_unknown(ckpt.path, keys)
    refuse_deeper(ckpt.path, unmatched, config)
    _refuse_overlaps(ckpt.path, patches)
    order = {name: i for i, name in enumerate(shapes)}
    patches.sort(key=lambda p: (order[p.target], p.rows or (0, 0)))
    return LoraFile(ckpt.path, "+".join(sorted(families)), patches, sorted(unmatched), _notes(ckpt.metadata))


def _layer_patches(ckpt: Checkpoint, stem: str, slot: Slot, parts: dict[str, str],
                   shapes: dict[str, tuple[int, ...]]) -> tuple[list[LoraPatch], list[str]]:
    """One LoRA layer's patches (its weight, its bias) and its keys that change nothing (an alpha with no LoRA)."""
    weight = shapes[f"{slot.layer}.weight"]
    start, stop = slot.rows or (0, weight[0])
    out_shape = (stop - start, weight[1])
    where = f"layer {slot.layer}" + (f" rows {start}:{stop}" if slot.rows else "")
    check = _Checker(ckpt, where, slot.swap)
    if slot.leaf == "bias":
        if set(parts) != {"diff"}:
            raise CheckpointError(ckpt.path, f"{stem} names a bias, which only takes a .diff (has {sorted(parts)})")
        return [check.diff(f"{slot.layer}.bias", slot.rows, parts["diff"], (weight[0],))], []
    out, low_rank = [], bool(parts.keys() & {"up", "down", "mid"})
    if low_rank:
        if "mid" in parts:
            raise CheckpointError(ckpt.path, f"'{parts['mid']}': LoCon/Tucker mid weights are for convolutions; "
                                             f"{where} is a linear layer")
        if "diff" in parts:
            raise CheckpointError(ckpt.path, f"{stem} has both a low-rank pair and a full .diff: which applies?")
        out.append(check.lora(f"{slot.layer}.weight", slot.rows, parts, out_shape))
    elif "diff" in parts:
        out.append(check.diff(f"{slot.layer}.weight", slot.rows, parts["diff"], out_shape))
    if "diff_b" in parts:
        if f"{slot.layer}.bias" not in shapes:
            raise CheckpointError(ckpt.path, f"'{parts['diff_b']}' changes the bias of {slot.layer}, which has none")
        out.append(check.diff(f"{slot.layer}.bias", slot.rows, parts["diff_b"], out_shape[:1]))
    return out, [parts[p] for p in ("alpha", "dora_scale") if p in parts and not low_rank]


def _swap(t: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) rows as BFL's (shift, scale): comfy.utils.swap_scale_shift, its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class _Checker:
    """Reads one layer's tensors, checking each against the model's shapes (the error names both)."""

    def __init__(self, ckpt: Checkpoint, where: str, swap: bool):
        self.ckpt, self.where, self.swap = ckpt, where, swap

    def tensor(self, key: str, want: tuple[int | None, ...] | None = None, what: str = "") -> torch.Tensor:
        """The tensor of `key`; `want` its shape (None: any size there, e.g. the rank)."""
        t = self.ckpt.read(key)
        if not t.is_floating_point():
            raise CheckpointError(self.ckpt.path, f"'{key}' holds {t.dtype} values", "a float tensor")
        if want is not None and (t.dim() != len(want) or any(w not in (None, g) for w, g in zip(want, t.shape))):
            need = ", ".join("rank" if w is None else str(w) for w in want)
            raise CheckpointError(self.ckpt.path, f"'{key}' ({what} of {self.where}) has shape {list(t.shape)} but "
                                                  f"this model needs [{need}]: a LoRA for another model size or kind?")
        return t

    def lora(self, target: str, rows: tuple[int, int] | None, parts: dict[str, str],
             out_shape: tuple[int, int]) -> LoraPatch:
        for need in ("up", "down"):
            if need not in parts:
                other = parts.get("up") or parts.get("down")
                raise CheckpointError(self.ckpt.path, f"'{other}' has no matching {need} weight (a damaged LoRA?)")
        down = self.tensor(parts["down"], (None, out_shape[1]), "down")
        up = self.tensor(parts["up"], (out_shape[0], down.shape[0]), "up")
        alpha = None
        if "alpha" in parts:
            a = self.tensor(parts["alpha"])
            if a.numel() != 1:
                raise CheckpointError(self.ckpt.path, f"'{parts['alpha']}' has shape {list(a.shape)}", "a scalar")
            alpha = float(a.item())  # ComfyUI reads it the same way
        dora = None
        if "dora_scale" in parts:
            dora = self.tensor(parts["dora_scale"])
            if tuple(dora.shape) not in ((out_shape[0], 1), (1, out_shape[1])):
                raise CheckpointError(self.ckpt.path, f"'{parts['dora_scale']}' has shape {list(dora.shape)}",
                                      f"[{out_shape[0]}, 1] or [1, {out_shape[1]}] for {self.where}")
            if self.swap and dora.shape[0] == out_shape[0]:  # a per-output-row scale follows its rows
                dora = _swap(dora)
        keys = tuple(parts[p] for p in ("up", "down", "alpha", "dora_scale") if p in parts)
        return LoraPatch(target, rows, "lora", _swap(up) if self.swap else up, down, alpha, dora, None, keys)

    def diff(self, target: str, rows: tuple[int, int] | None, key: str, shape: tuple[int, ...]) -> LoraPatch:
        d = self.tensor(key, shape, "full delta")
        return LoraPatch(target, rows, "diff", diff=_swap(d) if self.swap else d, source_keys=(key,))


def _refuse_overlaps(path: Path, patches: list[LoraPatch]) -> None:
    """Two keys of one file on the same rows (e.g. `linear1_qkv` and `to_q`): ComfyUI keeps one, silently."""
    seen: dict[str, list[tuple[int, int, LoraPatch]]] = {}
    for p in patches:
        a, b = p.rows or (0, 1 << 62)
        for c, d, q in seen.get(p.target, []):
            if a < d and c < b:
                raise CheckpointError(path, f"'{p.source_keys[0]}' and '{q.source_keys[0]}' both patch {p.target}"
                                            + (f" rows {max(a, c)}:{min(b, d)}" if p.rows and q.rows else ""))
        seen.setdefault(p.target, []).append((a, b, p))


def _notes(metadata: dict[str, str]) -> list[str]:
    """diffusers writes PEFT's lora_alpha and r in the metadata; ComfyUI ignores them (scale 1), as we do."""
    try:
        conf = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        return ["metadata 'lora_adapter_metadata' is not JSON"]
    alphas = {k[: -len("lora_alpha")]: v for k, v in conf.items() if k.endswith("lora_alpha")} \
        if isinstance(conf, dict) else {}
    return [f"metadata gives {p}lora_alpha={a}, r={conf.get(p + 'r')}: diffusers would scale by lora_alpha / r; "
            "ComfyUI ignores the metadata (scale 1), and so does this reader"
            for p, a in alphas.items() if a != conf.get(p + "r", a) or conf.get(p + "alpha_pattern")]

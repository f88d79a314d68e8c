"""The pack's DiT as ComfyUI's own MODEL: ComfyUI's Flux model class with our DiT as its diffusion model.

ComfyUI's KSampler, SamplerCustomAdvanced, LoRA loaders, ModelSamplingFlux and memory manager then work on it:
- `KontextFlux` is the diffusion model. It serves ComfyUI's Flux forward signature (`x, timestep, context, y,
  guidance, ref_latents, control, transformer_options, ref_latents_method`) through the engine's denoiser, which it
  builds once per run (the references, ids and RoPE tables) and reuses while the references stay the same. Its
  parameters are our DiT's own, under BFL's names, so ComfyUI's LoRA key maps find them.
- ComfyUI's block patches (`patches_replace["dit"]`), ControlNet residuals and diffusion-model wrappers are honoured
  where ComfyUI's own Flux honours them, with the arguments it gives them (the rope tensor as `pe`, see ComfyRope);
  anything else it is handed is named in a warning, once.
- `KontextModelPatcher` is ComfyUI's ModelPatcher, except that a LoRA on an fp8 or fp4 layer is not merged into the
  quantised weight (which would re-quantise it, and ignore its scale): it is applied to the dequantised weight at
  each call, exactly.
Outside ComfyUI the loader hands out a `StandaloneModel` with the same `.model.diffusion_model`, so the Kontext
Sampler works in plain Python too.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from torch import nn

from kontext.backend import DiTBackend
from kontext.denoiser import Denoiser
from kontext.dit import BlockRunner
from kontext.errors import InputError
from kontext.ids import METHODS
from kontext.rope import Positions

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("Kontext model: %s is not supported by the pack's DiT and is ignored", what)


class ComfyRope:
    """The rope tensor ComfyUI's Flux hands its block patches as `pe` (its EmbedND output: [B, 1, N, D/2, 2, 2]
    float32, each pair's rotation [[cos, -sin], [sin, cos]]), made from our positions once per run and batch size,
    and read back into our positions when a patch calls the original block with it (a patch may pass another)."""

    def __init__(self) -> None:
        self._ours: Positions | None = None
        self._theirs: dict[int, torch.Tensor] = {}  # by batch size, for the positions in _ours

    def to_comfy(self, pe: Positions, batch: int) -> torch.Tensor:
        if self._ours is not pe:  # a new run (the denoiser keeps one Positions per run and text length)
            self._ours, self._theirs = pe, {}
        if batch not in self._theirs:
            rotation = torch.stack((pe.cos, -pe.sin, pe.sin, pe.cos), dim=-1).unflatten(-1, (2, 2))
            self._theirs[batch] = rotation.expand(batch, *rotation.shape[1:])  # ComfyUI's ids have a row per image
        return self._theirs[batch]

    def from_comfy(self, pe: torch.Tensor) -> Positions:
        if self._ours is not None and any(pe is t for t in self._theirs.values()):
            return self._ours
        return Positions(pe[..., 0, 0], pe[..., 1, 0])  # the rotation's first column: (cos, sin)


class ComfyBlocks(BlockRunner):
    """Runs the blocks as ComfyUI's Flux does: block replacements from `patches_replace["dit"]` (given ComfyUI's
    arguments), ControlNet residuals added to the image tokens after each block."""

    def __init__(self, transformer_options: dict, control: dict | None, depths: tuple[int, int],
                 rope: ComfyRope | None = None):
        self.options = transformer_options  # ComfyUI's own Flux writes block_type/index into it too
        self.depths = depths  # (double, single) block counts, reported as total_blocks
        self.replace = transformer_options.get("patches_replace", {}).get("dit", {})
        self.control = control
        self.rope = rope or ComfyRope()

    def is_plain(self) -> bool:
        residuals = bool(self.control) and any(self.control.get(k) for k in ("input", "output"))
        return not self.replace and not residuals

    def double(self, i, block, img, txt, vec, pe):
        self.options.update(block_type="double", block_index=i, total_blocks=self.depths[0])
        if ("double_block", i) in self.replace:
            def original(args):
                out_img, out_txt = block(args["img"], args["txt"], args["vec"], self.rope.from_comfy(args["pe"]))
                return {"img": out_img, "txt": out_txt}

            args = {"img": img, "txt": txt, "vec": vec, "pe": self.rope.to_comfy(pe, img.shape[0]),
                    "attn_mask": None, "transformer_options": self.options}
            out = self.replace[("double_block", i)](args, {"original_block": original})
            img, txt = out["img"], out["txt"]
        else:
            img, txt = block(img, txt, vec, pe)
        add = self._residual("input", i)
        if add is not None:
            img[:, :add.shape[1]] += add
        return img, txt

    def single(self, i, block, x, vec, pe, n_txt):
        self.options.update(block_type="single", block_index=i, total_blocks=self.depths[1])
        if ("single_block", i) in self.replace:
            def original(args):
                return {"img": block(args["img"], args["vec"], self.rope.from_comfy(args["pe"]))}

            args = {"img": x, "vec": vec, "pe": self.rope.to_comfy(pe, x.shape[0]), "attn_mask": None,
                    "transformer_options": self.options}
            x = self.replace[("single_block", i)](args, {"original_block": original})["img"]
        else:
            x = block(x, vec, pe)
        add = self._residual("output", i)
        if add is not None:
            x[:, n_txt: n_txt + add.shape[1]] += add
        return x

    def _residual(self, which: str, i: int) -> torch.Tensor | None:
        if self.control is None:
            return None
        found = self.control.get(which) or []
        return found[i] if i < len(found) else None


class KontextFlux(nn.Module):
    """ComfyUI's `diffusion_model` for our DiT: the DiT's own layers (shared, not copied) behind ComfyUI's Flux
    forward signature."""

    patch_size = 2  # ComfyUI's Flux model class reads it (concat_cond)

    def __init__(self, dit: DiTBackend):
        super().__init__()
        for name, child in dit.named_children():  # the same modules: parameters keep their BFL names
            self.add_module(name, child)
        self.config = dit.config
        object.__setattr__(self, "kontext_dit", dit)  # not a submodule: no second name for each parameter
        self._denoiser: tuple | None = None
        self._rope = ComfyRope()  # the run's positions as ComfyUI's patches take them

    @property
    def dtype(self) -> torch.dtype:  # ComfyUI's BaseModel.get_dtype() asks the diffusion model
        return self.kontext_dit.compute_dtype

    def denoiser(self, x: torch.Tensor, ref_latents: list[torch.Tensor], method: str) -> Denoiser:
        """The run's denoiser, built once and reused while the target size and the references stay the same
        (ComfyUI hands the references again, as new tensors, at every step)."""
        key = (tuple(x.shape[2:]), method, x.device, tuple(tuple(r.shape) for r in ref_latents))
        if self._denoiser is not None:
            old_key, old_refs, old = self._denoiser
            if old_key == key and all(torch.equal(a, b.to(a.device)) for a, b in zip(old_refs, ref_latents)):
                return old
        den = Denoiser(self.kontext_dit, tuple(x.shape[2:]), ref_latents, method, x.device, ref_space="model")
        self._denoiser = (key, [r.detach() for r in ref_latents], den)
        return den

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options={}, **kwargs):
        try:
            from comfy import patcher_extension
        except ImportError:  # plain Python: no wrappers to run
            return self._forward(x, timestep, context, y, guidance, ref_latents, control, transformer_options,
                                 **kwargs)
        wrappers = patcher_extension.get_all_wrappers(patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                      transformer_options)
        return patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options={}, **kwargs):
        """x [B, 16, h, w] model-space latent (ComfyUI scaled and shifted it), timestep [B] = sigma, context
        [B, L, 4096], y [B, 768], guidance [B], ref_latents: model-space latents -> velocity [B, 16, h, w]."""
        method = kwargs.pop("ref_latents_method", None) or "offset"
        if method not in METHODS:
            raise InputError(f"reference latent method {method!r} is not supported by the Kontext model (it takes "
                             f"{' or '.join(METHODS)}); set FluxKontextMultiReferenceLatentMethod to one of those")
        for name, value in kwargs.items():
            if value is not None:
                _warn_once(f"the model input {name!r}")
        patches = {k: v for k, v in transformer_options.get("patches", {}).items() if v}
        for name in patches:
            _warn_once(f"the transformer_options patch {name!r}")
        if transformer_options.get("rope_options"):
            _warn_once("transformer_options['rope_options']")
        if y is None:  # as ComfyUI's Flux: no pooled vector is a zero one
            y = torch.zeros(x.shape[0], self.config.vec_in_dim, device=x.device, dtype=x.dtype)
        if guidance is None and self.config.guidance_embed:
            raise InputError("the conditioning carries no guidance for this guidance-distilled model: add "
                             "FluxGuidance (Kontext's default is 2.5)")
        den = self.denoiser(x, list(ref_latents or []), method)
        blocks = ComfyBlocks(transformer_options, control, (self.config.depth, self.config.depth_single_blocks),
                             self._rope)
        return den(x, timestep, context, y, guidance, blocks).to(x.dtype)


def unet_config(dit: DiTBackend) -> dict:
    """ComfyUI's Flux unet_config for our DiT (its LoRA key maps read depth, single depth and hidden size)."""
    c = dit.config
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
            "vec_in_dim": c.vec_in_dim, "context_in_dim": c.context_in_dim, "hidden_size": c.hidden_size,
            "mlp_ratio": c.mlp_ratio, "num_heads": c.num_heads, "depth": c.depth,
            "depth_single_blocks": c.depth_single_blocks, "axes_dim": list(c.axes_dim), "theta": c.theta,
            "qkv_bias": c.qkv_bias, "guidance_embed": c.guidance_embed,
            "disable_unet_model_creation": True}  # ComfyUI builds no model of its own: ours is put in


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Weight key (as ComfyUI names it) -> its fp8 / fp4 layer."""
    from kontext.formats import layer_format

    return {f"diffusion_model.{n}.weight": m for n, m in model.diffusion_model.named_modules()
            if (f := layer_format(m)) is not None and f.quantized}


def comfy_model(dit: DiTBackend, load_device: torch.device, offload_device: torch.device):
    """A ComfyUI MODEL (ModelPatcher) around ComfyUI's Flux model class, with our DiT as its diffusion model."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux(unet_config(dit))
    config.set_inference_dtype(dit.compute_dtype, None)
    base = comfy.model_base.Flux(config, device=offload_device)
    base.diffusion_model = KontextFlux(dit)
    patcher_cls = _patcher_class(comfy.model_patcher)
    return patcher_cls(base, load_device=load_device, offload_device=offload_device)


_PATCHER = None


def _patcher_class(model_patcher):
    """ComfyUI's ModelPatcher, with LoRA on quantised layers applied at run time to the dequantised weight."""
    global _PATCHER
    if _PATCHER is not None:
        return _PATCHER

    class KontextModelPatcher(model_patcher.ModelPatcher):
        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            # ComfyUI's LoRA loaders would find no weight to patch in an engine and go on silently: refuse.
            self.model.diffusion_model.kontext_dit.capabilities.require("lora")
            return super().add_patches(patches, strength_patch, strength_model)

        def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
            layer = quantized_layers(self.model).get(key)
            if layer is None or key not in self.patches:
                return super().patch_weight_to_device(key, device_to, inplace_update)
            # Merging into fp8/fp4 values would re-quantise them: apply the delta to the dequantised weight per call.
            layer.weight_function = [model_patcher.LowVramPatch(key, self.patches)]

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for layer in quantized_layers(self.model).values():
                    layer.weight_function = []
            return super().unpatch_model(device_to, unpatch_weights)

    _PATCHER = KontextModelPatcher
    return _PATCHER


class StandaloneModel:
    """What the loader returns outside ComfyUI: the parts of a ModelPatcher that the pack's nodes use."""

    def __init__(self, dit: DiTBackend, load_device: torch.device):
        self.model = SimpleNamespace(diffusion_model=KontextFlux(dit))
        self.load_device = load_device

    def __repr__(self) -> str:
        return f"<Kontext MODEL (no ComfyUI): {type(self.model.diffusion_model).__name__} on {self.load_device}>"


def kontext_dit(model) -> DiTBackend:
    """Our DiT inside a MODEL from Load Kontext Model; a clear error for any other MODEL."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(inner, KontextFlux):
        raise InputError("Kontext Sampler needs the MODEL of Load Kontext Model (this one is "
                         f"{type(inner).__name__ if inner is not None else type(model).__name__}); for ComfyUI's own "
                         "models use KSampler")
    return inner.kontext_dit

"""The edit: references + instruction -> edited image, equal to diffusers' FluxKontextPipeline for the same inputs.

Three layers, each usable alone (the ComfyUI nodes use the first two):
- `encode_prompt`: tokenizers + CLIP-L + T5-XXL -> (txt [B, 512, D], pooled [B, 768]);
- `sample_latent`: DiT + conditioning + raw reference latents -> raw target latent (the rectified-flow loop);
- `KontextPipeline`: files -> models, PIL in, PIL out, with offloading and a progress callback.
"Raw" latents are the VAE's own (ComfyUI's LATENT); the 0.3611 scale and 0.1159 shift are applied around the DiT here.
"""
from __future__ import annotations

import gc
import logging
import traceback
from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from .backend import DiTBackend, named
from .denoiser import Denoiser
from .dit import PLAIN, BlockRunner
from .errors import InputError
from .params import LIBRARY, SamplingParams
from .sampling import euler_sample, flux_schedule, noise_for_denoise, noise_latent, schedule_for_denoise
from .latents import to_model_space, to_raw
from .vae_tiling import decode_or_tiled

log = logging.getLogger(__name__)
DIT_OFFLOADS = ("none", "stream")  # "stream": the DiT's blocks visit the GPU one at a time (kontext.offload)
Callback = Callable[[int, int, torch.Tensor], None]


@torch.no_grad()
def encode_prompt(clip: torch.nn.Module, t5: torch.nn.Module, tokenizers, prompts: str | Sequence[str],
                  max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 hidden states [B, max_length, D] (padded, no mask, as Flux was trained) and CLIP's pooled vector [B, 768]."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompt must be a string or a non-empty list of strings")
    clip_device = next(clip.parameters()).device
    t5_device = next(t5.parameters()).device
    _, pooled = clip(tokenizers.clip_ids(prompts).to(clip_device))
    txt = t5(tokenizers.t5_ids(prompts, max_length=max_length).to(t5_device))
    return txt, pooled


def _batched(t: torch.Tensor, B: int, name: str, device: torch.device) -> torch.Tensor:
    """t with batch 1 broadcast to B, or t with batch B; prompts x images order (each prompt's images together)."""
    if t.shape[0] == B:
        return t.to(device)
    if t.shape[0] >= 1 and B % t.shape[0] == 0:
        return t.to(device).repeat_interleave(B // t.shape[0], dim=0)
    raise InputError(f"{name} has batch {t.shape[0]}, which does not divide the batch of {B}")


def _check_conditioning(cfg, txt: torch.Tensor, pooled: torch.Tensor | None, what: str) -> None:
    if txt.dim() != 3 or txt.shape[-1] != cfg.context_in_dim or pooled is None or pooled.dim() != 2 or \
            pooled.shape[-1] != cfg.vec_in_dim:
        shapes = f"{list(txt.shape)} (text) and {None if pooled is None else list(pooled.shape)} (pooled)"
        raise InputError(f"{what} of shapes {shapes} does not fit this model, which takes [B, L, "
                         f"{cfg.context_in_dim}] T5 states and a [B, {cfg.vec_in_dim}] CLIP-L pooled vector: "
                         "encode the prompt with Flux's CLIP-L + T5-XXL")


def _check_size(width: object, height: object) -> None:
    """Latent geometry: any multiple of 8 (ComfyUI's VAEEncode crops to 8; odd latents are padded to patches)."""
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 and v % 8 == 0 for v in (width, height))
    if not ok:
        raise InputError(f"width and height must be multiples of 8 (16 preferred), at least 16; got {width}x{height}")


@torch.no_grad()
def sample_latent(dit: DiTBackend, txt: torch.Tensor, pooled: torch.Tensor, *, ref_latents: Sequence[torch.Tensor] = (),
                  width: int, height: int, seed: int = 0, steps: int = 28, guidance: float = 2.5,
                  true_cfg: float = 1.0, neg_txt: torch.Tensor | None = None, neg_pooled: torch.Tensor | None = None,
                  denoise: float = 1.0, init_latent: torch.Tensor | None = None, reference_method: str = "offset",
                  callback: Callback | None = None, num_images: int = 1,
                  device: torch.device | str | None = None, blocks: BlockRunner = PLAIN) -> torch.Tensor:
    """Run the rectified-flow sampler; returns the raw latent [B, 16, H/8, W/8] (float32, on `device`).

    B = prompts x num_images (each prompt's images together, as diffusers orders them). `ref_latents` are raw VAE
    latents [1 or B, 16, h, w] of any sizes (odd sides are padded, as ComfyUI does). Noise is drawn on the CPU from
    `seed` (same image on any device). The run happens on `device` (default: where `txt` is). `callback(step,
    total, x0)` gets a raw-space preview of the denoised estimate after each step; an exception it raises
    (kontext.errors.Cancelled) stops the run. `blocks` runs the DiT's blocks (kontext.dit.BlockRunner; e.g.
    kontext.offload.StreamingBlocks for a DiT whose blocks live in CPU memory).
    """
    _check_size(width, height)
    p = SamplingParams(steps=steps, guidance=guidance, true_cfg=true_cfg, denoise=denoise, seed=seed,
                       num_images=num_images, reference_method=reference_method).validated(LIBRARY)
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be callable, got {type(callback).__name__}")
    _check_conditioning(dit.config, txt, pooled, "conditioning")
    if p.true_cfg_on:
        if neg_txt is None or neg_pooled is None:
            raise InputError("true_cfg > 1 needs a negative conditioning (neg_txt and neg_pooled)")
        _check_conditioning(dit.config, neg_txt, neg_pooled, "the negative conditioning")
    device = torch.device(device) if device is not None else txt.device
    B = txt.shape[0] * p.num_images
    h, w = height // 8, width // 8  # latent size; odd sides are padded to whole patches inside the denoiser

    denoiser = Denoiser(dit, (h, w), list(ref_latents), p.reference_method, device)
    txt, pooled = _batched(txt, B, "txt", device), _batched(pooled, B, "pooled", device)
    if p.true_cfg_on:
        neg_txt, neg_pooled = _batched(neg_txt, B, "neg_txt", device), _batched(neg_pooled, B, "neg_pooled", device)
    g = torch.full((B,), p.guidance, device=device)

    # Schedule (mu from the target tokens only) and the starting point.
    sigmas = flux_schedule(p.steps, denoiser.n_target)
    noise = noise_latent(p.seed, B, height, width)
    if p.denoise < 1.0:
        if init_latent is None:
            raise InputError("denoise < 1 needs an initial latent (image-to-image)")
        if init_latent.dim() != 4 or tuple(init_latent.shape[1:]) != (16, h, w):
            raise InputError(f"initial latent {list(init_latent.shape)} does not match the output size "
                             f"{width}x{height}: expected [B, 16, {h}, {w}]")
        sigmas = schedule_for_denoise(sigmas, p.denoise)
        init = _batched(to_model_space(init_latent.float().cpu()), B, "initial latent", torch.device("cpu"))
        noise = noise_for_denoise(init, noise, float(sigmas[0]))
    x = noise.to(device)  # [B, 16, h, w] model-space latent, float32 throughout (the DiT casts to its own dtype)
    last: dict[str, torch.Tensor] = {}

    def velocity(z: torch.Tensor, sigma: float) -> torch.Tensor:
        # diffusers hands the model float32(sigma * 1000) / 1000; reproduce that rounding for bit-level parity.
        t = torch.tensor(sigma, dtype=torch.float32) * 1000 / 1000
        v = denoiser(z, t, txt, pooled, g, blocks)
        if p.true_cfg_on:  # guide away from the negative: v_neg + s * (v_pos - v_neg)
            v_neg = denoiser(z, t, neg_txt, neg_pooled, g, blocks)
            v = v_neg + p.true_cfg * (v - v_neg)
        last["v"] = v
        return v

    def on_step(i: int, total: int, z: torch.Tensor) -> None:
        if callback is not None:
            x0 = z - float(sigmas[i + 1]) * last["v"]  # the denoised estimate: the nicest preview
            callback(i, total, to_raw(x0))

    x = euler_sample(velocity, x, sigmas, on_step)
    return to_raw(x)


def _check_dit_offload(value: object) -> str:
    if value not in DIT_OFFLOADS:
        raise InputError(f"dit_offload must be one of {', '.join(map(repr, DIT_OFFLOADS))}; got {value!r}")
    return value


def _free(device: torch.device) -> None:
    # Only CUDA's caching allocator keeps freed blocks from other users; on the CPU a full gc.collect() frees
    # nothing of use and costs ~0.2 s an edit (most of a tiny-model edit).
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class KontextPipeline:
    """FLUX.1 Kontext [dev] image editing from the release files, as a plain Python object.

    >>> pipe = KontextPipeline.from_files("flux1-kontext-dev.safetensors", "ae.safetensors", "clip_l.safetensors",
    ...                                   "t5xxl_fp16.safetensors", device="cuda")
    >>> image = pipe.edit("make it night", ["photo.jpg"], seed=1)[0]
    """

    compiled = False  # the DiT's blocks are compiled (from_files(compile=True))

    def __init__(self, dit: DiTBackend, vae, clip, t5, tokenizers, device: torch.device, offload: bool = True,
                 dit_offload: str = "none"):
        self.dit, self.vae, self.clip, self.t5, self.tokenizers = dit, vae, clip, t5, tokenizers
        self.base_dit = dit  # without LoRAs: set_loras always starts from it
        self.device = device
        self.offload = offload
        self.dit_offload = _check_dit_offload(dit_offload)

    def set_loras(self, loras=(), mode: str = "auto") -> None:
        """Use these LoRAs [(file, strength), ...] from now on (replacing any set before; () removes them). The
        base weights are never changed, so removing a LoRA or changing its strength is exact."""
        from .lora.apply import with_loras

        if loras:
            self.base_dit.capabilities.require("lora")
        self.dit = with_loras(self.base_dit, loras, mode) if loras else self.base_dit
        if self.compiled:  # with_loras's block copies still hold the base blocks' compiled calls: rebind them
            self._compile_dit()

    def _compile_dit(self) -> None:
        from .compile import compile_blocks

        compile_blocks(self.dit, device=self.device)

    @classmethod
    def from_files(cls, dit, vae, clip_l, t5xxl, tokenizers=None, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, precision: str | None = None,
                   offload: bool = True, loras=(), dit_offload: str = "none",
                   compile: bool = False, backend: str = "torch", engine=None) -> "KontextPipeline":
        """Load every model. With `offload` (the default on GPUs) the text encoders stay in CPU memory and visit the
        GPU only to encode a prompt, leaving its memory to the 12B DiT. With `dit_offload="stream"` the DiT's blocks
        stay in CPU memory too and visit the GPU one at a time while it runs (see kontext.offload: for 16 GB and 8 GB
        cards, at a cost in speed). With `compile` the DiT's blocks are compiled (kontext.compile.compile_blocks:
        the first edit pays the compile, later ones run faster). `backend="tensorrt"` with `engine` (a .plan or a
        folder of engines) runs the DiT as a TensorRT engine (see load_dit); it takes no LoRA, offload or compile."""
        from .flux_loader import load_dit
        from .precision import resolve
        from .text.clip import load_clip_l
        from .text.t5 import load_t5xxl
        from .text.tokenizers import load_tokenizers
        from .vae import load_vae
        from .weights.loading import as_device

        _check_dit_offload(dit_offload)
        device = as_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        named(backend).capabilities.check_request(device, loras, dit_offload, compile)  # before anything loads
        if dit_offload != "none" and device.type == "cpu":
            log.info("dit_offload=%r has nothing to do on the CPU: the DiT is in CPU memory already", dit_offload)
            dit_offload = "none"
        prec = resolve(precision, dtype, device)
        dtype = prec.compute  # of the DiT's activations, and of the text encoders and VAE
        offload = offload and device.type != "cpu"
        text_device = torch.device("cpu") if offload else device
        text_dtype = dtype if device.type != "cpu" else torch.float32
        if loras:  # read and checked first: a wrong file should not wait for 30 GB of weights
            from .flux_loader import dit_config
            from .lora.apply import read_all

            loras = read_all(loras, dit_config(dit))
        tok = load_tokenizers(tokenizers)  # first: a missing folder should not wait for 30 GB of weights
        # fp16 overflows in the VAE's decoder on real images (diffusers' Flux VAE config says force_upcast): fp32.
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        dit_device = torch.device("cpu") if dit_offload == "stream" else device
        # An engine is made on the current CUDA device: make it the run's.
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            dit_model = load_dit(dit, device=dit_device, dtype=dtype, precision=precision, backend=backend,
                                 engine=engine)
        if dit_offload == "stream":
            from .offload import prepare

            prepare(dit_model, device)
        pipe = cls(dit=dit_model,
                   vae=load_vae(vae, device=device, dtype=vae_dtype),
                   clip=load_clip_l(clip_l, device=text_device, dtype=text_dtype),
                   t5=load_t5xxl(t5xxl, device=text_device, dtype=text_dtype),
                   tokenizers=tok, device=device, offload=offload, dit_offload=dit_offload)
        pipe.compiled = compile
        if compile:
            pipe._compile_dit()
        if loras:
            pipe.set_loras(loras)
        return pipe

    @classmethod
    def from_models_dir(cls, models, **kwargs) -> "KontextPipeline":
        """Find the release files (or make-tiny's) in a ComfyUI-style `models/` folder."""
        from .files import find_model_files

        found = find_model_files(models)
        # An explicit tokenizer folder wins over the one found beside the models (and both over the packaged ones).
        tokenizers = kwargs.pop("tokenizers", None) or found.get("tokenizers")
        return cls.from_files(found["dit"], found["vae"], found["clip_l"], found["t5xxl"], tokenizers=tokenizers,
                              **kwargs)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.offload:
            self.clip.to(self.device), self.t5.to(self.device)
        try:
            txt, pooled = encode_prompt(self.clip, self.t5, self.tokenizers, prompts)
            return txt.to(self.device), pooled.to(self.device)
        finally:
            if self.offload:
                self.clip.to("cpu"), self.t5.to("cpu")
                _free(self.device)

    def _block_runner(self):
        """The runner of the DiT's blocks for one sampling run, as a context manager (a streaming runner puts
        every block's weights back in CPU memory when the run ends, also when it is cancelled)."""
        if self.dit_offload == "stream":
            from .offload import StreamingBlocks

            return StreamingBlocks(self.dit, self.device)
        return nullcontext(PLAIN)

    @torch.no_grad()
    def edit(self, prompt: str, references: Sequence = (), *, seed: int = 0, steps: int = 28, guidance: float = 2.5,
             width: int | None = None, height: int | None = None, resize_references: bool = True,
             reference_method: str = "offset", negative_prompt: str | None = None, true_cfg: float = 1.0,
             denoise: float = 1.0, init_image=None, num_images: int = 1,
             callback: Callback | None = None) -> list:
        """Edit `references` (paths, PIL images, arrays) following `prompt`; no references = text to image.

        The output size defaults to the first reference's prepared size; `denoise < 1` starts from `init_image`
        (default: the first reference) noised to that level instead of from pure noise.
        """
        from PIL import Image

        from .references import load_image, output_size, preferred_size, prepare_reference, to_pil, to_tensor

        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise InputError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be callable, got {type(callback).__name__}")
        # Every number first: a wrong one must not wait for the text encoders, the VAE and the sampler.
        p = SamplingParams(steps=steps, guidance=guidance, true_cfg=true_cfg, denoise=denoise, seed=seed,
                           num_images=num_images, reference_method=reference_method, width=width,
                           height=height).validated(LIBRARY)
        true_cfg, denoise = p.true_cfg, p.denoise
        if isinstance(references, (str, bytes)) or not isinstance(references, Sequence):
            references = [references]
        prepared = [prepare_reference(r, resize=resize_references) for r in references]
        init = None  # image-to-image starts from init_image, else from the first (prepared) reference
        if denoise < 1.0:
            init = load_image(init_image) if init_image is not None else (prepared[0] if prepared else None)
            if init is None:
                raise InputError("denoise < 1 needs an init image or a reference to start from")
        # Size: the first reference's; for image-to-image without references, the init image's preferred size.
        size_from = prepared[0].size if prepared else (preferred_size(*init.size) if init is not None else None)
        w, h = output_size(width, height, size_from)
        if true_cfg > 1.0 and negative_prompt is None:
            # diffusers runs true CFG only with a negative prompt; say so rather than silently ignore it.
            log.warning("true_cfg=%s has no effect without a negative prompt (pass negative_prompt='' to "
                        "guide away from the empty prompt)", true_cfg)
            true_cfg = 1.0
        if init_image is not None and denoise == 1.0:
            log.warning("init_image is unused with denoise=1 (the run starts from pure noise)")
        try:
            # One visit of the text encoders for both prompts (each is a 5-10 GB move when offloaded).
            txt, pooled = self.encode([prompt] + ([negative_prompt] if true_cfg > 1.0 else []))
            neg_txt, neg_pooled = (txt[1:], pooled[1:]) if true_cfg > 1.0 else (None, None)
            txt, pooled = txt[:1], pooled[:1]
            ref_latents = [self.vae.encode(to_tensor(p).to(self.device)).float() for p in prepared]
            init_latent = None
            if init is not None:
                init = init.resize((w, h), Image.Resampling.LANCZOS) if init.size != (w, h) else init
                init_latent = self.vae.encode(to_tensor(init).to(self.device)).float()
            with self._block_runner() as blocks:
                latent = sample_latent(self.dit, txt, pooled, ref_latents=ref_latents, width=w, height=h,
                                       seed=p.seed, steps=p.steps, guidance=p.guidance, true_cfg=true_cfg,
                                       neg_txt=neg_txt, neg_pooled=neg_pooled, denoise=denoise,
                                       init_latent=init_latent, reference_method=p.reference_method,
                                       callback=callback, num_images=p.num_images, device=self.device,
                                       blocks=blocks)
            pixels = decode_or_tiled(self.vae, latent)
            return to_pil(pixels)
        except BaseException as exc:
            # The traceback keeps the run's frames, and their tensors, alive: drop their locals so that _free
            # below can give the memory back now, not whenever the caller lets go of the exception.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            _free(self.device)

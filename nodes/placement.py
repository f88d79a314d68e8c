"""Where our models live and run, and how they share the GPU with ComfyUI's own models.

The DiT is a ComfyUI MODEL (see model.py, `model_for`): ComfyUI's memory manager places it like its own Flux,
loading it partially when the GPU is smaller than the weights. The text encoders and the VAE follow a policy
(the loaders' `device` input):
- "auto": inside ComfyUI the model is handed to ComfyUI's memory manager (wrapped in its ModelPatcher): loading it
  unloads ComfyUI's models when the GPU needs the room, ComfyUI may move ours back to RAM when its own models need
  the room, and "Unload models" / "Free memory" release it like any core model. Outside ComfyUI: CUDA when present.
- "offload": kept in RAM, moved to the GPU only while a node runs, then moved back (least VRAM, slower); for the
  DiT: RAM is its offload device.
- "cpu": loaded and run on the CPU (slow; for machines without a GPU and for tests).

ComfyUI's ModelPatcher writes attributes such as `.device` onto the module it manages, so for the text encoders and
the VAE the patcher gets a plain container module holding ours.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from kontext.errors import InputError

from .host import comfy

log = logging.getLogger(__name__)

POLICIES = ("auto", "offload", "cpu")


class Holder(torch.nn.Module):
    """A plain module around one or more engine models, for ComfyUI's ModelPatcher to move around."""

    def __init__(self, **models: torch.nn.Module):
        super().__init__()
        for name, model in models.items():
            self.add_module(name, model)

    def get_dtype(self) -> torch.dtype:  # ModelPatcher.model_dtype() asks for this
        return next(self.parameters()).dtype


# One subclass per kind, so that ComfyUI's log says "Requested to load KontextDiT" rather than "Holder".
HOLDERS = {kind: type(name, (Holder,), {"__doc__": f"{name} weights, for ComfyUI's memory manager."})
           for kind, name in (("dit", "KontextDiT"), ("text", "KontextTextEncoders"), ("vae", "KontextVAE"))}


def _devices(policy: str, kind: str) -> tuple[torch.device, torch.device]:
    """(run device, rest device) for a policy; `kind` picks ComfyUI's offload rule (dit, text, vae)."""
    cpu = torch.device("cpu")
    if policy not in POLICIES:
        raise InputError(f"device policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if policy == "cpu":
        return cpu, cpu
    mm = comfy("comfy.model_management")
    if mm is None:
        return (torch.device("cuda") if torch.cuda.is_available() else cpu), cpu
    run = mm.get_torch_device()
    if policy == "offload":
        return run, cpu
    rest = {"dit": mm.unet_offload_device, "text": mm.text_encoder_offload_device,
            "vae": mm.vae_offload_device}[kind]()
    return run, rest


def model_for(dit, policy: str):
    """The DiT as a MODEL: ComfyUI's own (ModelPatcher over its Flux class) inside ComfyUI, else a stand-in."""
    from .model import StandaloneModel, comfy_model

    run, rest = _devices(policy, "dit")
    if comfy("comfy.model_patcher") is None:
        return StandaloneModel(dit, run)
    return comfy_model(dit, run, rest)


@contextmanager
def loaded(model, extra_bytes: int = 0) -> Iterator[torch.device]:
    """The MODEL ready to run for the block; yields its run device. Inside ComfyUI its memory manager loads it,
    partially (the rest streams at use) when the GPU is smaller than the weights, and applies its patches (LoRA)."""
    mm = comfy("comfy.model_management")
    if mm is not None and hasattr(model, "patch_model"):
        mm.load_models_gpu([model], memory_required=extra_bytes)
    else:
        model.model.diffusion_model.to(model.load_device)
    yield model.load_device


def compute_dtype(policy: str, kind: str) -> torch.dtype:
    """The dtype to load in: bf16 (fp16 where bf16 is unsupported) on GPUs, fp32 on the CPU (as ComfyUI does)."""
    run, _ = _devices(policy, kind)
    if run.type == "cpu":
        return torch.float32
    if run.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class Placed:
    """One loaded model set (e.g. the DiT, or CLIP-L + T5) with its policy: `with placed.running(): ...`."""

    def __init__(self, policy: str, kind: str, label: str, **models: torch.nn.Module):
        self.policy, self.kind, self.label = policy, kind, label
        self.run_device, self.rest_device = _devices(policy, kind)
        self.holder = HOLDERS[kind](**models)
        self._patcher = None

    def __getattr__(self, name: str):  # placed.dit, placed.clip ... (only called for missing attributes)
        holder = self.__dict__.get("holder")
        if holder is not None and name in holder._modules:
            return holder._modules[name]
        raise AttributeError(name)

    def __repr__(self) -> str:  # ComfyUI prints node inputs this way in its error reports
        return f"<Kontext {self.kind}: {self.label}, device policy {self.policy}, on {self.device}>"

    def size_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.holder.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.holder.parameters()).device

    @contextmanager
    def running(self, extra_bytes: int = 0) -> Iterator["Placed"]:
        """The models on their run device for the duration of the block (per the policy)."""
        mm = comfy("comfy.model_management")
        if self.policy == "auto" and mm is not None and self._load_with_comfy(mm, extra_bytes):
            yield self
            return
        if self.run_device.type != "cpu" and mm is not None:
            # Make room the ComfyUI way: its own models leave the GPU first.
            mm.free_memory(self.size_bytes() + extra_bytes + mm.minimum_inference_memory(), self.run_device)
        self.holder.to(self.run_device)
        try:
            yield self
        finally:
            if self.policy == "offload" and self.run_device != self.rest_device:
                self.holder.to(self.rest_device)
                if mm is not None:
                    mm.soft_empty_cache()
                elif torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _load_with_comfy(self, mm, extra_bytes: int) -> bool:
        """Hand the models to ComfyUI's memory manager and have it load them fully; False if that is unavailable."""
        try:
            if self._patcher is None:
                from comfy.model_patcher import ModelPatcher

                self._patcher = ModelPatcher(self.holder, load_device=self.run_device,
                                             offload_device=self.rest_device, size=self.size_bytes())
            try:
                mm.load_models_gpu([self._patcher], memory_required=extra_bytes, force_full_load=True)
            except TypeError:  # ComfyUI before force_full_load: our modules cannot be partially loaded anyway
                mm.load_models_gpu([self._patcher], memory_required=extra_bytes)
        except ImportError:
            return False
        # A partial load would leave some of our layers in RAM: ours have no per-layer weight streaming.
        if self.run_device.type != "cpu" and any(p.device != self.run_device for p in self.holder.parameters()):
            self.holder.to(self.run_device)
        return True

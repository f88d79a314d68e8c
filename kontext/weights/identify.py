"""What kind of model a checkpoint holds, read off its tensor names: the "it looks like ..." of wrong-file errors."""
from __future__ import annotations

# (a substring of some tensor name, what the file then is), most specific first: an SDXL checkpoint also holds a VAE
# and a CLIP, a Flux DiT in diffusers' names also has "transformer_blocks.".
KINDS = (
    ("input_blocks.0.0.weight", "an SD 1.x/SDXL UNet checkpoint"),
    ("conditioner.embedders.", "an SDXL checkpoint"),
    ("double_blocks.", "a Flux diffusion transformer (DiT)"),
    ("single_transformer_blocks.", "a Flux diffusion transformer (DiT, diffusers layout)"),
    ("transformer_blocks.", "a diffusion transformer (DiT)"),
    ("encoder.down.0.block.0.conv1.weight", "a Flux VAE (ae.safetensors): load it with the VAE loader"),
    ("encoder.down_blocks.0.resnets.0.", "a diffusers VAE"),
    ("embeddings.token_embedding.", "a CLIP text encoder"),
    ("layer.0.SelfAttention.", "a T5 text encoder"),
)


def describe(keys: list[str]) -> str:
    """A short description of the model these tensor names belong to, for error messages."""
    for marker, what in KINDS:
        if any(marker in k for k in keys):
            return what
    return f"an unknown model ({len(keys)} tensors such as {', '.join(sorted(keys)[:3])})"

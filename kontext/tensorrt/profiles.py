"""The shapes an exported Kontext DiT must serve: one dynamic image-token axis and a batch axis.

An edit's image tokens are the target's followed by every reference's, 16x16 pixels a token. The export and the
engine's optimisation profiles cover the target alone or with one or two references at any of Kontext's 17 preferred
resolutions (about one megapixel each: 4,042 to 4,150 tokens an image). The text is T5's 512 tokens in our
pipeline and diffusers'; ComfyUI pads T5 prompts to 256 tokens only (longer ones run longer), so the text axis is
dynamic too, 256 to 512 tokens, optimised for 512.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InputError
from ..references import PREFERRED_RESOLUTIONS

TEXT_TOKENS = 512
TEXT_RANGE = (256, 512, 512)  # min, opt, max: ComfyUI's shortest T5 conditioning to ours
PIXELS_PER_TOKEN = 16  # 8x VAE downsampling, then 2x2 patches


def image_tokens(width: int, height: int) -> int:
    return (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: min / opt / max of the image-token count, of the batch and of the text length."""
    name: str
    tokens: tuple[int, int, int]
    batch: tuple[int, int, int]
    text: tuple[int, int, int] = TEXT_RANGE

    def covers(self, batch: int, tokens: int, text: int) -> bool:
        return (self.tokens[0] <= tokens <= self.tokens[2] and self.batch[0] <= batch <= self.batch[2]
                and self.text[0] <= text <= self.text[2])

    def describe(self) -> str:
        return (f"{self.name}: {self.tokens[0]}..{self.tokens[2]} image tokens, batch {self.batch[0]}.."
                f"{self.batch[2]}, {self.text[0]}..{self.text[2]} text tokens")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        return cls(str(d["name"]), tuple(int(v) for v in d["tokens"]), tuple(int(v) for v in d["batch"]),
                   tuple(int(v) for v in d.get("text", TEXT_RANGE)))


def kontext_profiles(max_references: int = 2, max_batch: int = 2) -> list[Profile]:
    """A profile per reference count 0..max_references: the target and every reference at any preferred
    resolution, optimised for 1024x1024 ones. No reference is text to image, and ComfyUI's negative conditioning
    when it carries no reference latents. Batch 2 covers a positive and a negative prompt in one call."""
    if not 1 <= max_references <= 4 or not 1 <= max_batch <= 16:
        raise InputError(f"max_references must be 1..4 and max_batch 1..16, got {max_references} and {max_batch}")
    per_image = [image_tokens(w, h) for w, h in PREFERRED_RESOLUTIONS]
    lo, hi, opt = min(per_image), max(per_image), image_tokens(1024, 1024)
    names = {0: "no reference", 1: "1 reference"}
    return [Profile(names.get(n, f"{n} references"), ((1 + n) * lo, (1 + n) * opt, (1 + n) * hi),
                    (1, 1, max_batch)) for n in range(0, max_references + 1)]


def token_range(profiles: list[Profile], axis: str = "tokens") -> tuple[int, int]:
    """The smallest and largest image-token count (or batch, or text length) any profile serves: the export's
    dynamic-axis bounds."""
    return min(getattr(p, axis)[0] for p in profiles), max(getattr(p, axis)[2] for p in profiles)


def choose(profiles: list[Profile], batch: int, tokens: int, text: int) -> int:
    """The index of the profile serving a call, the tightest one when several do; else an InputError naming every
    profile's bounds (an engine never runs a shape it was not built for)."""
    fits = [i for i, p in enumerate(profiles) if p.covers(batch, tokens, text)]
    if not fits:
        bounds = "; ".join(p.describe() for p in profiles)
        raise InputError(f"{tokens} image tokens with {text} text tokens at batch {batch} are outside this engine's "
                         f"profiles ({bounds}). Use a preferred Kontext resolution (the default resize does), fewer "
                         "references, a shorter prompt, or build an engine with wider profiles")
    return min(fits, key=lambda i: profiles[i].tokens[2] - profiles[i].tokens[0])


def input_shapes(profile: Profile, config) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every graph input under `profile`, for the engine build."""
    def shapes(make):
        return tuple(make(b, n, t) for b, n, t in zip(profile.batch, profile.tokens, profile.text))

    return {"img": shapes(lambda b, n, t: (b, n, config.in_channels)), "img_ids": shapes(lambda b, n, t: (b, n, 3)),
            "txt": shapes(lambda b, n, t: (b, t, config.context_in_dim)),
            "txt_ids": shapes(lambda b, n, t: (b, t, 3)), "timesteps": shapes(lambda b, n, t: (b,)),
            "y": shapes(lambda b, n, t: (b, config.vec_in_dim)), "guidance": shapes(lambda b, n, t: (b,))}

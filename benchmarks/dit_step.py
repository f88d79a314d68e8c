"""Time one DiT denoising step, ours against diffusers' FluxTransformer2DModel, on the same weights in one process.

    python benchmarks/dit_step.py [--size tiny|medium|full] [--device cuda] [--dtype bf16] [--res 1024] [--repeat 5]

Both models get the same random weights (ours converted to diffusers' names) and the same inputs: a target of
res x res pixels, one reference of the same size, 512 text tokens. Reports median milliseconds per call, the ratio
diffusers / ours (> 1 means we are faster) and how far the two outputs differ (they compute the same function, so
rounding only). Both models are built directly in the timed dtype on the device; `full` needs a GPU with room for
two 12B models in bf16 (about 48 GB). On CUDA the timings synchronise and use warm-up calls.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kontext.bench import default_dtype
from kontext.config import FluxConfig
from kontext.dit import FluxDiT
from kontext.ids import image_ids, text_ids

SIZES = {
    "tiny": FluxConfig.tiny(),
    "medium": FluxConfig(hidden_size=1024, num_heads=8, depth=4, depth_single_blocks=8, vec_in_dim=768,
                         context_in_dim=4096),
    "full": FluxConfig.kontext_dev(),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(cfg: FluxConfig, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they run: a 12B model never visits host RAM
        ours = FluxDiT(cfg, dtype=dtype).to(dtype).eval()  # compute dtype stated, dense weights in it too
    for p in ours.parameters():
        p.data.normal_(0, 0.02)
    try:
        from diffusers import FluxTransformer2DModel
    except Exception as exc:  # no peer to compare with here (not installed, or it fails to import): ours alone
        print(f"diffusers not available ({type(exc).__name__}: {exc}); timing ours alone")
        return ours, None
    from kontext.tiny import diffusers_state

    with torch.device(device), default_dtype(dtype):
        theirs = FluxTransformer2DModel(
            patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.depth,
            num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
            pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed, axes_dims_rope=cfg.axes_dim)
    theirs.load_state_dict(diffusers_state(ours.state_dict(), cfg))  # copied into its params: dtype kept
    return ours, theirs.eval()


def timed(fn, repeat: int, device: str) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cfg, dtype = SIZES[args.size], DTYPES[args.dtype]
    ours, theirs = build(cfg, args.device, dtype)
    grid = (args.res // 8, args.res // 8)  # latent size
    n = grid[0] * grid[1] // 4
    img = torch.randn(1, 2 * n, cfg.in_channels, device=args.device, dtype=dtype)
    ids = image_ids(grid, [grid]).to(args.device)
    txt = torch.randn(1, 512, cfg.context_in_dim, device=args.device, dtype=dtype)
    tids = text_ids(512).to(args.device)
    y = torch.randn(1, cfg.vec_in_dim, device=args.device, dtype=dtype)
    t = torch.full((1,), 0.5, device=args.device)
    g = torch.full((1,), 2.5, device=args.device)
    a = timed(lambda: ours(img, ids, txt, tids, t, y, g), args.repeat, args.device)
    if theirs is None:
        print(f"{args.size} {args.dtype} on {args.device}: ours {a:.1f} ms per step (diffusers not installed)")
        return
    peer = lambda: theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                          img_ids=ids[0], txt_ids=tids[0], guidance=g, return_dict=False)[0]
    b = timed(peer, args.repeat, args.device)
    # The same function on the same weights, or the ratio compares two different computations.
    mine, other = ours(img, ids, txt, tids, t, y, g).float(), peer().float()
    diff = float((mine - other).norm() / other.norm())
    print(f"{args.size} {args.dtype} on {args.device}, {args.res}px target + reference + 512 text tokens: "
          f"ours {a:.1f} ms, diffusers {b:.1f} ms, ratio diffusers/ours {b / a:.2f}; outputs differ by {diff:.1e} "
          f"(relative)")


if __name__ == "__main__":
    main()

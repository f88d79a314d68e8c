"""True CFG (a negative prompt with true_cfg > 1) against diffusers' FluxKontextPipeline on the same tiny weights."""
from __future__ import annotations

import numpy as np
import torch

# pytest fixtures: our pipeline from make-tiny's folder, diffusers' FluxKontextPipeline from the same weights
from test_pipeline import ours, reference_image, theirs  # noqa: F401


def test_true_cfg_with_negative_prompt_matches_diffusers(ours, theirs):  # noqa: F811
    """An edit with a negative prompt and true_cfg against diffusers' FluxKontextPipeline (true_cfg_scale,
    negative_prompt) on the same tiny weights: neg + scale * (pos - neg) each step. The negative prompt differs from
    the positive and the scale is high, so guiding the wrong way moves pixels by far more than the tolerance.
    Tolerance 2/255: the same fp32 math in another order, so at most a rounding step on a few pixels."""
    ref = reference_image(80, 64, 4)
    prompt, negative, scale, seed, w, h = "make it night", "a blurry photo of a dog", 4.0, 11, 64, 80
    a = ours.edit(prompt, [ref], seed=seed, steps=2, width=w, height=h, resize_references=False,
                  negative_prompt=negative, true_cfg=scale)[0]
    b = theirs(image=ref, prompt=prompt, negative_prompt=negative, true_cfg_scale=scale, height=h, width=w,
               num_inference_steps=2, guidance_scale=2.5, generator=torch.Generator("cpu").manual_seed(seed),
               max_area=w * h, _auto_resize=False, max_sequence_length=512, output_type="pil").images[0]
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 2, diff.max()

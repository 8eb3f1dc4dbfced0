"""Paint-with-words on an imported diffusers UNet (issue 17): the attention
processor adds w' log(1 + sigma) max(QK^T) A in cross-attention only, per
sample; the painted phrase's attention mass inside its mask rises, and
unconditional rows are unchanged."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from ediffi.paint import PaintWithWordsAttnProcessor, Region, resize_pww_mask_to_tokens  # noqa: E402
from ediffi.pipeline import GenerationRequest, RequestRun, encode_request  # noqa: E402


class RecordingProcessor(PaintWithWordsAttnProcessor):
    """Keeps the cross-attention probabilities of each painted call."""

    def __init__(self):
        super().__init__()
        self.probs: list[torch.Tensor] = []

    def attention_probs(self, query, key, scale, mask, strength, sigma):
        probs = super().attention_probs(query, key, scale, mask, strength, sigma)
        self.probs.append(probs)
        return probs


def _left_half(width: int, height: int) -> Image.Image:
    canvas = Image.new("RGB", (width, height), "#000000")
    canvas.paste(Image.new("RGB", (width // 2, height), "#ff0000"), (0, 0))
    return canvas


def _inputs(model, request):
    run = RequestRun(model, request, encode_request(model, request))
    pending = run.pending()
    return pending.expert, pending.inputs


def test_painted_phrase_gains_attention_inside_its_mask(imported_sdxl_dir):
    from ediffi.model import load_model

    model = load_model(imported_sdxl_dir)
    prompt = "a red cat on the house"
    plain = GenerationRequest(prompt=prompt, steps=8, seed=3, guidance_scale=5.0)
    painted = GenerationRequest(prompt=prompt, steps=8, seed=3, guidance_scale=5.0, color_map=_left_half(32, 32),
                                regions=[Region("#ff0000", "cat", 2.0)])
    expert_name, painted_inputs = _inputs(model, painted)
    _, plain_inputs = _inputs(model, plain)
    expert = model.stages["base"].experts[expert_name]
    recorder = RecordingProcessor()
    expert.unet.set_attn_processor(recorder)

    mask = painted_inputs.pww_mask  # [2, L, h, w]: cond row painted, uncond row zero
    columns = mask[0].flatten(1).amax(dim=1).nonzero().flatten()
    assert len(columns) >= 1 and mask[1].abs().max() == 0 and painted_inputs.pww_strength[1] == 0

    def mass_inside(probs_list, row):
        """Share of the phrase columns' attention that falls inside the mask, per layer."""
        shares = []
        for probs in probs_list:
            tokens = probs.shape[2]
            inside = resize_pww_mask_to_tokens(mask[:1, columns[:1]], tokens)[0, :, 0] > 0.5  # [tokens]
            phrase = probs[row, :, :, columns].sum(dim=-1).mean(dim=0)  # [tokens]
            shares.append(float(phrase[inside].sum() / phrase.sum()))
        return shares

    with torch.no_grad():
        denoised_painted = expert(**painted_inputs.as_kwargs())
        painted_probs = recorder.probs
        recorder.probs = []
        # The same rows, strength zero: the plain attention, through the same code.
        zero = painted_inputs.as_kwargs()
        zero["pww_strength"] = torch.tensor([1e-30, 0.0])  # painted path taken, bias ~0
        expert(**zero)
        baseline_probs = recorder.probs
        # Unpainted request: diffusers' own processor (no pww kwargs at all).
        denoised_plain = expert(**plain_inputs.as_kwargs())

    assert len(painted_probs) == len(baseline_probs) >= 2  # every cross-attention layer
    painted_share, baseline_share = mass_inside(painted_probs, 0), mass_inside(baseline_probs, 0)
    for before, after in zip(baseline_share, painted_share):
        assert after > before + 0.05, (baseline_share, painted_share)
    # Unconditional rows: exactly the plain attention probabilities ...
    for a, b in zip(painted_probs, baseline_probs):
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    # ... and the same denoised row as an unpainted request's, up to rounding
    # of diffusers' fused attention kernel; the conditional row changes.
    torch.testing.assert_close(denoised_painted[1], denoised_plain[1], rtol=1e-4, atol=1e-4)
    assert (denoised_painted[0] - denoised_plain[0]).abs().max() > 1e-3

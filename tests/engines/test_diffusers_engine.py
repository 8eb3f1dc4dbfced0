"""The imported tiny SDXL base + refiner through the serving engine (issue
17): batch invariance across requests of other sizes, steps, guidance,
samplers and paint-with-words; the VAE decoder batched across requests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from ediffi.model import DECODER  # noqa: E402
from ediffi.paint import Region  # noqa: E402
from ediffi.pipeline import GenerationRequest, generate  # noqa: E402


def _color_map(width: int, height: int) -> Image.Image:
    canvas = Image.new("RGB", (width, height), "#000000")
    canvas.paste(Image.new("RGB", (width // 2, height), "#ff0000"), (0, 0))
    return canvas


def _others() -> list[GenerationRequest]:
    sizes = [(32, 32), (48, 32), (32, 48)]
    requests = []
    for i in range(15):
        width, height = sizes[i % len(sizes)]
        painted = i % 4 == 1
        requests.append(GenerationRequest(
            prompt=["a blue dog in the sky", "a red cat on the house", "a green tree"][i % 3],
            negative_prompt="yellow" if i % 2 else "", steps=2 + i % 3, guidance_scale=[1.0, 3.0, 7.5][i % 3],
            sampler=["euler", "heun", "dpmpp_2m"][i % 3], seed=100 + i, width=width, height=height,
            color_map=_color_map(width, height) if painted else None,
            regions=[Region("#ff0000", ["dog", "cat", "tree"][i % 3], 0.6)] if painted else [],
        ))
    return requests


def test_sdxl_request_alone_equals_among_15_others(imported_sdxl):
    from engines.engine import Engine, EngineConfig, EngineHooks
    from engines.torch_backend import TorchBackend

    target = GenerationRequest(prompt="a red cat on the house", steps=4, sampler="euler", guidance_scale=5.0,
                               seed=11, width=48, height=32)
    backend = TorchBackend(imported_sdxl, max_batch=16)
    alone = Engine(backend, EngineConfig(max_rows_per_tick=None)).generate(target).images[0]
    reference = generate(imported_sdxl, target)[0]

    batches = []
    engine = Engine(backend, EngineConfig(max_rows_per_tick=None), hooks=EngineHooks(on_batch=batches.append))
    others = _others()
    handles = [engine.submit(r) for r in others[:7]]
    target_handle = engine.submit(target)
    handles += [engine.submit(r) for r in others[7:]]
    engine.run_until_idle()
    outcomes = [h.result(0) for h in handles]
    assert all(o.status == "succeeded" for o in outcomes), [o.error for o in outcomes]
    together = target_handle.result(0).images[0]

    def max_diff(a, b):
        return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())

    assert together.size == (48, 32)
    assert max_diff(alone, together) <= 2
    assert max_diff(alone, reference) <= 2
    # Decoder rows of several requests (of one latent shape) share a call.
    decoder_batches = [b for b in batches if b.expert == DECODER]
    assert max(b.requests for b in decoder_batches) > 1
    assert {o.images[0].size for o in outcomes} == {(32, 32), (48, 32), (32, 48)}

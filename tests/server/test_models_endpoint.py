"""GET /v1/models for the shipped model (issue 17): its capabilities read from
models/default/model.json: one fixed square size, the cascade's stages and
experts by sigma, paint-with-words and style images."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.main import capabilities
from server.settings import Settings

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "default"


def test_models_endpoint_describes_the_shipped_model() -> None:
    if not (MODEL_DIR / "model.json").is_file():
        pytest.skip("models/default holds no model")
    app = create_app(Settings(allow_anonymous=True), capabilities=capabilities(MODEL_DIR), static_dir=None)

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            return await client.get("/v1/models")

    response = asyncio.run(get())
    assert response.status_code == 200
    (model,) = response.json()["data"]
    caps = model["capabilities"]
    assert caps["sizes"] == {"default_width": 64, "default_height": 64, "fixed": True, "multiple_of": 64}
    assert [s["name"] for s in caps["stages"]] == ["base", "sr"]
    base = caps["stages"][0]["experts"]
    assert base[0]["sigma_hi"] is None and base[-1]["sigma_lo"] == 0.0  # highest noise first, covering [0, inf)
    assert all(e["kind"] == "ediffi_unet" for s in caps["stages"] for e in s["experts"])
    assert caps["style_image"] is True and caps["paint_with_words"] is True

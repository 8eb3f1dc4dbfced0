"""``GET /v1/models``: the loaded model and what it can do (OpenAI-style list).

One model per deployment. Its capabilities (sizes, stages and experts,
paint-with-words, style images) come from its model.json, read at the
process edge; clients and the web UI show only the controls that work.
With them, what a client may send: the largest side, the samplers, and each
request field's default and limits (the settings' limits, and the model's
`sr_noise_level` range, null where the field does not apply).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.deps import SettingsDep

router = APIRouter(tags=["models"])


@router.get("/v1/models")
async def list_models(request: Request, settings: SettingsDep) -> dict:
    """The served model, OpenAI list format, with an ``ediffi`` capabilities object."""
    capabilities = request.app.state.capabilities
    described = capabilities.as_json(
        max_image_side=settings.max_image_side, max_n=settings.max_n, max_steps=settings.max_steps
    )
    return {
        "object": "list",
        "data": [
            {
                "id": capabilities.id,
                "object": "model",
                "owned_by": "ediffi-serving",
                "capabilities": described,
            }
        ],
    }

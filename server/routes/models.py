"""``GET /v1/models`` and ``GET /v1/models/{model_id}``: the loaded model and what it can do
(OpenAI's model objects: ``id``, ``object``, ``created``, ``owned_by``).

One model per deployment. Its capabilities (sizes, stages and experts,
paint-with-words, style images) come from its model.json, read at the
process edge; clients and the web UI show only the controls that work.
With them, what a client may send: the largest side, the samplers, and each
request field's default and limits (the settings' limits, and the model's
`sr_noise_level` range, null where the field does not apply).

``created`` is the model.json's modification time (epoch seconds), read with the
capabilities at start (``server.main.capabilities``): stable while the model
directory is unchanged, and the same on every replica of one image.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, status

from server.deps import SettingsDep
from server.schemas import OpenAIError
from server.settings import Settings

router = APIRouter(tags=["models"])

OWNED_BY = "ediffi-serving"


def served_model(request: Request, settings: Settings) -> dict[str, Any]:
    """The served model as an OpenAI model object, with an ``ediffi`` capabilities object."""
    capabilities = request.app.state.capabilities
    described = capabilities.as_json(
        max_image_side=settings.max_image_side, max_n=settings.max_n, max_steps=settings.max_steps
    )
    return {
        "id": capabilities.id,
        "object": "model",
        "created": capabilities.created,
        "owned_by": OWNED_BY,
        "capabilities": described,
    }


@router.get("/v1/models")
async def list_models(request: Request, settings: SettingsDep) -> dict:
    """The served model, OpenAI list format, with an ``ediffi`` capabilities object."""
    return {"object": "list", "data": [served_model(request, settings)]}


@router.get(
    "/v1/models/{model_id}",
    responses={404: {"model": OpenAIError, "description": "Not the served model's id (code model_not_found)"}},
)
async def retrieve_model(model_id: str, request: Request, settings: SettingsDep) -> dict:
    """The served model by its id (OpenAI's ``models.retrieve``); any other id is a 404 ``model_not_found``."""
    model = served_model(request, settings)
    if model_id != model["id"]:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail={
                "message": f"The model {model_id!r} does not exist here: this server serves {model['id']!r}",
                "param": "model",
                "code": "model_not_found",
            },
        )
    return model

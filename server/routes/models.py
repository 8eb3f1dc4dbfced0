"""``GET /v1/models``: the loaded model and what it can do (OpenAI-style list).

One model per deployment. Its capabilities (sizes, stages and experts,
paint-with-words, style images) come from its model.json, read at the
process edge; clients and the web UI show only the controls that work.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter(tags=["models"])


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """The served model, OpenAI list format, with an ``ediffi`` capabilities object."""
    capabilities = request.app.state.capabilities
    return {
        "object": "list",
        "data": [
            {
                "id": capabilities.id,
                "object": "model",
                "owned_by": "ediffi-serving",
                "capabilities": capabilities.as_json(),
            }
        ],
    }

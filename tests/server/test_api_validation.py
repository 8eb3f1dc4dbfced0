"""Hostile input: every request below must be refused with a 4xx that names the field, never a 500.

One table, run against the in-process queue (validation happens before any
queue call, so the backend does not matter here); nothing is ever queued.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from ediffi.failure import field_loc
from tests.support.api import (
    Backend,
    b64,
    color_map_png,
    gif_bytes,
    jpeg_bytes,
    png_bytes,
    png_claiming_size,
    run_async,
    service,
)

PROMPT = "a red circle on the left and a blue square"
COLOR_MAP = b64(color_map_png(32))


def pww(**overrides: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"color_map": COLOR_MAP, "regions": [{"color": "#ff0000", "phrase": "red circle"}]}
    value.update(overrides)
    return {"prompt": PROMPT, "paint_with_words": value}


def region(**fields: Any) -> dict[str, Any]:
    return pww(regions=[{"color": "#ff0000", "phrase": "red circle", **fields}])


def truncated_png() -> bytes:
    data = png_bytes(64, 64, (1, 2, 3))
    return data[: len(data) // 2]


def sixteen_bit_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("I;16", (16, 16)).save(buffer, "PNG")
    return buffer.getvalue()


BODY = ["body"]
PWW = ["body", "paint_with_words"]
# (case id, JSON body or raw bytes, expected status, expected loc of the first error (None: any))
CASES: list[tuple[str, Any, int, list | None]] = [
    ("missing prompt", {}, 422, BODY + ["prompt"]),
    ("empty prompt", {"prompt": ""}, 422, BODY + ["prompt"]),
    ("blank prompt", {"prompt": "  \n\t "}, 422, BODY + ["prompt"]),
    ("invisible-only prompt", {"prompt": "\u200b\u200d\ufeff "}, 422, BODY + ["prompt"]),
    ("control-only prompt", {"prompt": "\u0000\u0007\u001b\u007f"}, 422, BODY + ["prompt"]),
    ("combining-marks-only prompt", {"prompt": "\u0301\u0308\u20dd"}, 422, BODY + ["prompt"]),
    ("blank-glyph prompt", {"prompt": "\u3164\u2800\u115f\uffa0"}, 422, BODY + ["prompt"]),
    ("blank-glyph phrase", region(phrase="\u2800"), 422, PWW + ["regions", 0, "phrase"]),
    ("long prompt", {"prompt": "x" * 201}, 422, BODY + ["prompt"]),
    ("prompt int", {"prompt": 5}, 422, BODY + ["prompt"]),
    ("prompt null", {"prompt": None}, 422, BODY + ["prompt"]),
    ("prompt list", {"prompt": ["a"]}, 422, BODY + ["prompt"]),
    ("prompt lone surrogate", b'{"prompt": "a \\ud800 b"}', 422, None),
    ("long negative prompt", {"prompt": "a", "negative_prompt": "y" * 201}, 422, BODY + ["negative_prompt"]),
    ("n zero", {"prompt": "a", "n": 0}, 422, BODY + ["n"]),
    ("n negative", {"prompt": "a", "n": -1}, 422, BODY + ["n"]),
    ("n above max_n", {"prompt": "a", "n": 5}, 422, BODY + ["n"]),
    ("n huge", {"prompt": "a", "n": 10**30}, 422, BODY + ["n"]),
    ("n string", {"prompt": "a", "n": "2"}, 422, BODY + ["n"]),
    ("n float", {"prompt": "a", "n": 2.0}, 422, BODY + ["n"]),
    ("n bool", {"prompt": "a", "n": True}, 422, BODY + ["n"]),
    ("steps zero", {"prompt": "a", "steps": 0}, 422, BODY + ["steps"]),
    ("steps above max", {"prompt": "a", "steps": 51}, 422, BODY + ["steps"]),
    ("steps text", {"prompt": "a", "steps": "many"}, 422, BODY + ["steps"]),
    ("guidance NaN", b'{"prompt": "a", "guidance_scale": NaN}', 422, BODY + ["guidance_scale"]),
    ("guidance Infinity", b'{"prompt": "a", "guidance_scale": Infinity}', 422, BODY + ["guidance_scale"]),
    ("guidance overflow", b'{"prompt": "a", "guidance_scale": 1e999}', 422, BODY + ["guidance_scale"]),
    ("guidance negative", {"prompt": "a", "guidance_scale": -1}, 422, BODY + ["guidance_scale"]),
    ("guidance too big", {"prompt": "a", "guidance_scale": 1000}, 422, BODY + ["guidance_scale"]),
    ("seed negative", {"prompt": "a", "seed": -2}, 422, BODY + ["seed"]),
    ("seed too big", {"prompt": "a", "seed": 2**32}, 422, BODY + ["seed"]),
    ("seed float", {"prompt": "a", "seed": 1.5}, 422, BODY + ["seed"]),
    ("unknown sampler", {"prompt": "a", "sampler": "ddim"}, 422, BODY + ["sampler"]),
    ("unknown response_format", {"prompt": "a", "response_format": "png"}, 422, BODY + ["response_format"]),
    ("unknown field", {"prompt": "a", "stpes": 10}, 422, BODY + ["stpes"]),
    ("body is a list", [], 422, BODY),
    ("body is null", b"null", 422, BODY),
    ("body is a string", b'"a red fox"', 422, BODY),
    ("invalid JSON", b'{"prompt": ', 422, None),
    ("not JSON at all", b"prompt=a+red+fox", 422, None),
    ("deeply nested JSON", b"[" * 100_000, 422, ["body"]),
    ("style not base64", {"prompt": "a", "style_image": "not base64 !!"}, 422, BODY + ["style_image"]),
    ("style empty", {"prompt": "a", "style_image": ""}, 422, BODY + ["style_image"]),
    ("style not an image", {"prompt": "a", "style_image": b64(b"hello world")}, 422, BODY + ["style_image"]),
    ("style GIF", {"prompt": "a", "style_image": b64(gif_bytes())}, 422, BODY + ["style_image"]),
    ("style truncated PNG", {"prompt": "a", "style_image": b64(truncated_png())}, 422, BODY + ["style_image"]),
    ("style number", {"prompt": "a", "style_image": 12}, 422, BODY + ["style_image"]),
    # CLIP's processor scales the shorter side up to its input size: a 1 px strip would become gigabytes.
    ("style a one-pixel strip", {"prompt": "a", "style_image": b64(png_bytes(4096, 1))}, 422, BODY + ["style_image"]),
    ("style aspect 9:1", {"prompt": "a", "style_image": b64(png_bytes(10, 90))}, 422, BODY + ["style_image"]),
    ("pww missing color map", {"prompt": PROMPT, "paint_with_words": {"regions": []}}, 422, PWW + ["color_map"]),
    ("pww no regions", pww(regions=[]), 422, PWW + ["regions"]),
    ("pww too many regions", pww(regions=[{"color": f"#0000{i:02x}", "phrase": "blue"} for i in range(5)]), 422,
     PWW + ["regions"]),
    ("pww two thousand regions", pww(regions=[{"color": "#ff0000", "phrase": "red"}] * 2_000), 422,
     PWW + ["regions"]),
    ("pww colour not hex", region(color="red"), 422, PWW + ["regions", 0, "color"]),
    ("pww colour short hex", region(color="#f00"), 422, PWW + ["regions", 0, "color"]),
    ("pww colour not in map", region(color="#00ff00"), 422, PWW + ["regions", 0, "color"]),
    ("pww duplicate colour",
     pww(regions=[{"color": "#ff0000", "phrase": "red circle"}, {"color": "#FF0000", "phrase": "blue square"}]), 422,
     PWW + ["regions", 1, "color"]),
    ("pww phrase not in prompt", region(phrase="green triangle"), 422, PWW + ["regions", 0, "phrase"]),
    ("pww phrase part of a word", region(phrase="circ"), 422, PWW + ["regions", 0, "phrase"]),
    ("pww phrase blank", region(phrase="   "), 422, PWW + ["regions", 0, "phrase"]),
    ("pww strength above 10", region(strength=10.5), 422, PWW + ["regions", 0, "strength"]),
    ("pww strength negative", region(strength=-0.1), 422, PWW + ["regions", 0, "strength"]),
    ("pww strength string", region(strength="high"), 422, PWW + ["regions", 0, "strength"]),
    ("pww region extra field", region(weight=1), 422, PWW + ["regions", 0, "weight"]),
    ("pww colour map JPEG", pww(color_map=b64(jpeg_bytes(32, 32))), 422, PWW + ["color_map"]),
    ("pww colour map not square", pww(color_map=b64(color_map_png(64, 32))), 422, PWW + ["color_map"]),
    ("pww colour map not base64", pww(color_map="%%%"), 422, PWW + ["color_map"]),
    ("pww colour map 16-bit", pww(color_map=b64(sixteen_bit_png())), 422, None),
    ("pww is a string", {"prompt": "a", "paint_with_words": "yes"}, 422, PWW),
    # 413: sizes.
    ("style too many bytes", {"prompt": "a", "style_image": b64(b"\x89PNG" + b"\x00" * 70_000)}, 413,
     BODY + ["style_image"]),
    ("style too many pixels", {"prompt": "a", "style_image": b64(png_bytes(300, 300))}, 413, BODY + ["style_image"]),
    ("style bomb header", {"prompt": "a", "style_image": b64(png_claiming_size(100_000, 100_000))}, 413,
     BODY + ["style_image"]),
    ("style header claims 4000x4000", {"prompt": "a", "style_image": b64(png_claiming_size(4000, 4000))}, 413,
     BODY + ["style_image"]),
    ("colour map bomb header", pww(color_map=b64(png_claiming_size(20_000, 20_000))), 413, PWW + ["color_map"]),
    ("colour map too many pixels", pww(color_map=b64(color_map_png(512))), 413, PWW + ["color_map"]),
]


@pytest.mark.parametrize("body, status, loc", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
@run_async
async def test_hostile_generate_requests_are_refused_naming_the_field(body: Any, status: int, loc: list | None) -> None:
    async with service(Backend("memory")) as svc:
        if isinstance(body, bytes):
            response = await svc.client.post(
                "/generate", content=body, headers={"content-type": "application/json", "Prefer": "respond-async"}
            )
        else:
            response = await svc.client.post("/generate", json=body, headers={"Prefer": "respond-async"})
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        detail = response.json()["detail"]
        if status in (413, 422):
            assert isinstance(detail, list) and detail
            assert all({"loc", "msg", "type"} <= set(error) for error in detail)
            if loc is not None:
                assert detail[0]["loc"] == loc, detail
        assert await svc.queue.depth() == 0


@run_async
async def test_all_cheap_errors_are_reported_together() -> None:
    async with service(Backend("memory")) as svc:
        body = {
            "prompt": PROMPT,
            "n": 9,
            "steps": 500,
            "paint_with_words": {
                "color_map": COLOR_MAP,
                "regions": [{"color": "#ff0000", "phrase": "dragon"}, {"color": "#ff0000", "phrase": "blue square"}],
            },
        }
        response = await svc.client.post("/generate", json=body)
        assert response.status_code == 422
        locs = [error["loc"] for error in response.json()["detail"]]
        assert ["body", "n"] in locs and ["body", "steps"] in locs
        assert PWW + ["regions", 0, "phrase"] in locs and PWW + ["regions", 1, "color"] in locs


@run_async
async def test_error_bodies_echo_no_huge_inputs() -> None:
    async with service(Backend("memory")) as svc:
        response = await svc.client.post("/generate", json={"prompt": "x" * 5000})
        assert response.status_code == 422
        assert len(response.content) < 1000


@run_async
async def test_request_body_over_the_limit_is_413_before_it_is_read() -> None:
    async with service(Backend("memory"), max_image_bytes=1024) as svc:
        big = b'{"prompt": "' + b"a" * 200_000 + b'"}'
        response = await svc.client.post("/generate", content=big, headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert response.json()["detail"][0]["loc"] == ["body"]

        async def chunks():  # no Content-Length: counted while streaming
            for _ in range(50):
                yield b" " * 10_000

        streamed = await svc.client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"prompt": "a", "size": "1024x1024"}, ["body", "size"]),
        ({"prompt": "a", "size": "64x65"}, ["body", "size"]),
        ({"prompt": "a", "size": 64}, ["body", "size"]),
        ({"prompt": "a", "n": 0}, ["body", "n"]),
        ({"prompt": "a", "response_format": "png"}, ["body", "response_format"]),
        ({"prompt": "a", "paint_with_words": {"color_map": COLOR_MAP, "regions": [{"color": "#ff0000", "phrase": "x"}]}},
         PWW + ["regions", 0, "phrase"]),
        ({"n": 1}, ["body", "prompt"]),
    ],
)
@run_async
async def test_hostile_openai_requests_are_refused_naming_the_field(body: dict, loc: list) -> None:
    async with service(Backend("memory"), sync_timeout_s=0.2) as svc:
        response = await svc.client.post("/v1/images/generations", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]  # OpenAI's shape: the first field named as param
        assert ["body", *field_loc(error["param"])] == loc and error["type"] == "invalid_request_error"

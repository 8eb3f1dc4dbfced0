"""Request validation beyond the static schema: every limit of :class:`~server.settings.Settings`,
base64 and image checks, and the paint-with-words rules.

Errors use FastAPI's field-level format so a client can show each next to its
field: ``{"detail": [{"loc": ["body", "paint_with_words", "regions", 0, "color"],
"msg": ..., "type": ...}]}``. Invalid values are 422
(:class:`fastapi.exceptions.RequestValidationError`); sizes beyond the limits
are 413 (:class:`PayloadTooLarge`, same body format).

Images are never trusted: the encoded length is checked before decoding the
base64, the format (PNG/JPEG; colour maps PNG only) and the pixel count are
read from the header before any pixel is decoded (the decompression-bomb
guard, per call from the settings; PIL's global ``MAX_IMAGE_PIXELS`` is left
alone), and only then is the image decoded in full so truncated or corrupt
files are a 422 here rather than a failed job later.

This module imports no torch: the paint-with-words rules (phrase lookup,
colour-map aspect) come from the torch-free :mod:`ediffi.spec`, the same
code the worker's ``ediffi.paint`` runs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from fastapi.exceptions import RequestValidationError
from PIL import Image

from ediffi.capabilities import ModelCapabilities
from ediffi.config import GenerationDefaults
from ediffi.failure import InputError, field_loc
from ediffi.spec import (
    MAX_SEED, RANDOM_SEED, check_color_map_aspect, check_mask_size, check_mask_to_crop, check_seed, check_style_image_shape,
    find_phrase, pick_seed,
)
from server.schemas import GenerationOptions, JobPaintWithWords, JobParams, JobRegion, OpenAIImagesRequest
from server.settings import Settings

Loc = tuple[str | int, ...]

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class PayloadTooLarge(Exception):
    """A field (or the body) is larger than the limits allow: 413 with field-level detail."""

    def __init__(self, errors: Sequence[dict[str, Any]]) -> None:
        super().__init__("payload too large")
        self._errors = list(errors)

    def errors(self) -> list[dict[str, Any]]:
        return self._errors


def field_error(loc: Loc, msg: str, type_: str, *, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    """One error in FastAPI's format."""
    error: dict[str, Any] = {"loc": list(loc), "msg": msg, "type": type_}
    if ctx:
        error["ctx"] = ctx
    return error


def raise_invalid(errors: Iterable[dict[str, Any]]) -> None:
    """Raise a 422 with ``errors`` if there are any."""
    errors = list(errors)
    if errors:
        raise RequestValidationError(errors)


@dataclass
class ValidatedJob:
    """A request that passed every check: the queue's params, byte inputs and image count."""

    params: dict[str, Any]  # JobParams without "client"
    inputs: dict[str, bytes] = field(default_factory=dict)
    n: int = 1
    request_hash: str = ""

    @property
    def seeds(self) -> list[int]:
        return [self.params["seed"] + k for k in range(self.n)]


# --------------------------------------------------------------------- limits


def check_limits(request: GenerationOptions, settings: Settings) -> list[dict[str, Any]]:
    """The cheap checks that depend on the settings (lengths and counts) or on two fields (seed and n)."""
    body: Loc = ("body",)
    prompt, n = request.prompt, request.n
    errors: list[dict[str, Any]] = []
    for name, text in (("prompt", prompt), ("negative_prompt", request.negative_prompt)):
        if len(text) > settings.max_prompt_chars:
            errors.append(
                field_error(
                    body + (name,),
                    f"String should have at most {settings.max_prompt_chars} characters",
                    "string_too_long",
                    ctx={"max_length": settings.max_prompt_chars},
                )
            )
    if n > settings.max_n:
        errors.append(
            field_error(
                body + ("n",),
                f"Input should be less than or equal to {settings.max_n}",
                "less_than_equal",
                ctx={"le": settings.max_n},
            )
        )
    if request.seed is not None and request.seed != RANDOM_SEED:
        # The schema bounds the seed alone; image k uses seed + k, so n bounds it too
        # (the same rule the CLI and the worker apply).
        try:
            check_seed(request.seed, n)
        except InputError as exc:
            errors.append(
                field_error(body + ("seed",), exc.message, "less_than_equal", ctx={"le": MAX_SEED - max(n, 1) + 1})
            )
    if request.steps > settings.max_steps:
        errors.append(
            field_error(
                body + ("steps",),
                f"Input should be less than or equal to {settings.max_steps}",
                "less_than_equal",
                ctx={"le": settings.max_steps},
            )
        )
    pww = request.paint_with_words
    if pww is not None:
        regions_loc = body + ("paint_with_words", "regions")
        if len(pww.regions) > settings.max_regions:
            # Per-region checks only once the count is sane (each one scans the prompt).
            errors.append(
                field_error(
                    regions_loc,
                    f"List should have at most {settings.max_regions} items",
                    "too_long",
                    ctx={"max_length": settings.max_regions},
                )
            )
            return errors
        prompt_ok = len(prompt) <= settings.max_prompt_chars
        seen: dict[str, int] = {}
        for i, region in enumerate(pww.regions):
            color = region.color.lower()
            if color in seen:
                errors.append(
                    field_error(
                        regions_loc + (i, "color"),
                        f"colour {color} is already used by regions[{seen[color]}]; each region needs its own colour",
                        "duplicate_color",
                    )
                )
            else:
                seen[color] = i
            if prompt_ok and find_phrase(prompt, region.phrase) is None:
                errors.append(
                    field_error(
                        regions_loc + (i, "phrase"),
                        f"phrase {_clip(region.phrase)!r} does not occur in the prompt (whole words, any case)",
                        "phrase_not_in_prompt",
                    )
                )
    return errors


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------- images


def decode_base64_image(value: str, loc: Loc, max_bytes: int) -> bytes:
    """Bytes of a base64 (or ``data:...;base64,``) string; 413 if they would exceed ``max_bytes``."""
    text = _DATA_URL.sub("", value, count=1) if value[:5].lower() == "data:" else value
    # Cheap bound first (no copy): 4 base64 characters carry 3 bytes; whitespace only inflates it.
    if len(text) > 4 * (max_bytes // 3 + 1) + 4:
        compact = _WHITESPACE.sub("", text)
        if (len(compact) // 4) * 3 > max_bytes + 2:
            raise PayloadTooLarge(
                [
                    field_error(
                        loc,
                        f"image is about {len(compact) * 3 // 4} bytes; the limit is {max_bytes} bytes",
                        "too_large",
                        ctx={"max_bytes": max_bytes},
                    )
                ]
            )
        text = compact
    else:
        text = _WHITESPACE.sub("", text)
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise_invalid([field_error(loc, "not valid base64", "base64_decode")])
    if not data:
        raise_invalid([field_error(loc, "image is empty", "image_empty")])
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            [
                field_error(
                    loc,
                    f"image is {len(data)} bytes; the limit is {max_bytes} bytes",
                    "too_large",
                    ctx={"max_bytes": max_bytes},
                )
            ]
        )
    return data


def open_image(data: bytes, loc: Loc, max_pixels: int, formats: Sequence[str]) -> Image.Image:
    """Open, check the header size against ``max_pixels``, then decode fully.

    The pixel count comes from the header (``Image.open`` reads no pixels), so
    a small file claiming a huge canvas is refused before any allocation.
    """
    names = "/".join(formats)
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError:
        raise PayloadTooLarge([field_error(loc, "image has too many pixels", "too_many_pixels")]) from None
    except Exception:  # PIL raises many types for hostile bytes; none of them is our fault
        raise_invalid([field_error(loc, f"not a {names} image", "image_format")])
    width, height = image.size
    if width < 1 or height < 1:
        raise_invalid([field_error(loc, f"image has no pixels ({width}x{height})", "image_empty")])
    if width * height > max_pixels:
        image.close()
        raise PayloadTooLarge(
            [
                field_error(
                    loc,
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels",
                    "too_many_pixels",
                    ctx={"max_pixels": max_pixels},
                )
            ]
        )
    try:
        image.load()
    except Image.DecompressionBombError:
        raise PayloadTooLarge([field_error(loc, "image has too many pixels", "too_many_pixels")]) from None
    except Exception:
        raise_invalid([field_error(loc, f"{names} image is truncated or corrupt", "image_decode")])
    return image


def colors_present(image: Image.Image, colors: Sequence[str], loc: Loc) -> set[str]:
    """Those of ``colors`` (``#rrggbb``) that occur in ``image`` after ``convert("RGB")`` (as the worker
    sees it). Only the asked colours are looked up: a noisy map's million distinct colours as Python
    strings cost over 100 MB and seconds of a request."""
    try:
        red, green, blue = (np.asarray(band) for band in image.convert("RGB").split())
    except Exception:
        raise_invalid([field_error(loc, "colour map cannot be converted to RGB", "image_mode")])
    present = set()
    for color in colors:
        r, g, b = (int(color[k : k + 2], 16) for k in (1, 3, 5))
        if ((red == r) & (green == g) & (blue == b)).any():
            present.add(color)
    return present


# ------------------------------------------------------------------- requests


def check_model_fields(
    request: GenerationOptions, settings: Settings, capabilities: ModelCapabilities | None
) -> list[dict[str, Any]]:
    """Errors for fields the loaded model cannot honour: a size it does not
    make (or beyond `max_image_side`), a style image without an image encoder, and
    ModelCapabilities.request_errors: a sampler it lacks (ddim, pndm and ddpm on the shipped family) or
    too few steps for it, `use_karras_sigmas` where it cannot apply, an `sr_noise_level` outside its
    range (or for a model without one)."""
    if capabilities is None:
        return []
    body: Loc = ("body",)
    errors = [
        field_error(body + (name,), message, "unsupported_size")
        for name, message in capabilities.sizes.errors(request.width, request.height, settings.max_image_side).items()
    ]
    if request.style_image is not None and not capabilities.style_image:
        errors.append(
            field_error(
                body + ("style_image",), f"model {capabilities.id!r} has no image encoder: style_image is not supported",
                "unsupported_feature",
            )
        )
    # The worker would fail the job with the same rules; checked here so an async
    # request gets its 422 at once rather than a failed job later.
    problems = capabilities.request_errors(
        sampler=request.sampler, steps=request.steps, use_karras_sigmas=request.use_karras_sigmas,
        sr_noise_level=request.sr_noise_level, init_image=request.init_image is not None, strength=request.strength,
        mask=request.mask is not None,
    )
    errors += [field_error(body + (name,), message, "unsupported_value") for name, message in problems.items()]
    return errors


def with_model_defaults(
    request: GenerationOptions, settings: Settings, capabilities: ModelCapabilities | None
) -> GenerationOptions:
    """The request with the sampling fields it left out set to the served model's defaults
    (an imported model's are its diffusers pipeline's; steps within ``max_steps``), as
    ``GET /v1/models`` reports them (:meth:`GenerationDefaults.fill`); with an init image, its strength
    (:meth:`GenerationDefaults.strength_for`)."""
    defaults = capabilities.defaults if capabilities is not None else GenerationDefaults()
    filled = defaults.fill(
        steps=request.steps, guidance_scale=request.guidance_scale, sampler=request.sampler,
        use_karras_sigmas=request.use_karras_sigmas, max_steps=settings.max_steps,
    )
    update = {name: value for name, value in filled.items() if getattr(request, name) is None}
    if request.init_image is not None and request.strength is None:  # img2img's, or the model's inpainting one
        update["strength"] = defaults.strength_for(request.mask is not None)
    return request.model_copy(update=update) if update else request


def validate_generation(
    request: GenerationOptions, settings: Settings, capabilities: ModelCapabilities | None = None
) -> ValidatedJob:
    """Check a request against every limit and rule; return the queue params and inputs.

    Raises ``RequestValidationError`` (422) or :class:`PayloadTooLarge` (413).
    Cheap checks run first and report together; images are decoded last.
    CPU-bound (image decoding): call it from a thread pool when images are present.
    """
    body: Loc = ("body",)
    request = with_model_defaults(request, settings, capabilities)
    raise_invalid(check_limits(request, settings) + check_model_fields(request, settings, capabilities))

    inputs: dict[str, bytes] = {}
    if request.style_image is not None:
        loc = body + ("style_image",)
        data = decode_base64_image(request.style_image, loc, settings.max_image_bytes)
        with open_image(data, loc, settings.max_image_pixels, ("PNG", "JPEG")) as style_image:
            try:
                check_style_image_shape(*style_image.size)
            except InputError as exc:
                raise_invalid([field_error(loc, exc.message, "aspect_ratio")])
        inputs["style_image"] = data

    width, height = request.width, request.height
    if request.init_image is not None:
        loc = body + ("init_image",)
        data = decode_base64_image(request.init_image, loc, settings.max_image_bytes)
        with open_image(data, loc, settings.max_image_pixels, ("PNG", "JPEG")) as init_image:
            image_width, image_height = init_image.size
        if request.mask is not None:
            mask_loc = body + ("mask",)
            mask_data = decode_base64_image(request.mask, mask_loc, settings.max_image_bytes)
            with open_image(mask_data, mask_loc, settings.max_image_pixels, ("PNG", "JPEG")) as mask:
                try:
                    check_mask_size(mask.size, (image_width, image_height))
                except InputError as exc:
                    raise_invalid([field_error(mask_loc, exc.message, "mask_size")])
                if request.padding_mask_crop is not None:
                    try:
                        check_mask_to_crop(mask)
                    except InputError as exc:
                        raise_invalid([field_error(mask_loc, exc.message, "mask_empty")])
            inputs["mask"] = mask_data
        if (width is None or height is None) and capabilities is not None:
            # the image's size (rounded to the model's multiple) where not sent
            rule = capabilities.sizes
            width, height = rule.from_init_image(width, height, (image_width, image_height))
            problems = rule.errors(width, height, settings.max_image_side)
            if problems:
                detail = "; ".join(f"{name} {text}" for name, text in problems.items())
                raise_invalid([field_error(
                    loc, f"its size {image_width}x{image_height} would make {width}x{height} images ({detail}): "
                    "send width and height to resize it", "unsupported_size",
                )])
        inputs["init_image"] = data

    elif request.mask is not None:
        raise_invalid([field_error(body + ("mask",), "goes with an init_image: the mask says which of its pixels to "
                                   "repaint (white) and keep (black)", "missing_init_image")])
    if request.padding_mask_crop is not None and request.mask is None:
        raise_invalid([field_error(body + ("padding_mask_crop",), "goes with a mask (it crops the region around it)",
                                   "missing_mask")])

    pww_params: JobPaintWithWords | None = None
    pww = request.paint_with_words
    if pww is not None:
        loc = body + ("paint_with_words", "color_map")
        data = decode_base64_image(pww.color_map, loc, settings.max_image_bytes)
        color_map = open_image(data, loc, settings.max_image_pixels, ("PNG",))
        canvas_width = canvas_height = 1  # the shipped family's square canvas
        if capabilities is not None:
            canvas_width = width or capabilities.sizes.default_width
            canvas_height = height or capabilities.sizes.default_height
        try:
            check_color_map_aspect(*color_map.size, canvas_width=canvas_width, canvas_height=canvas_height)
        except InputError as exc:
            raise_invalid([field_error(body + tuple(field_loc(exc.field)), exc.message, "aspect_ratio")])
        present = colors_present(color_map, [region.color.lower() for region in pww.regions], loc)
        color_map.close()
        errors = [
            field_error(
                body + ("paint_with_words", "regions", i, "color"),
                f"colour {region.color.lower()} does not occur in the colour map",
                "color_not_in_map",
            )
            for i, region in enumerate(pww.regions)
            if region.color.lower() not in present
        ]
        raise_invalid(errors)
        inputs["color_map"] = data
        pww_params = JobPaintWithWords(
            regions=[
                JobRegion(color=region.color.lower(), phrase=region.phrase.strip(), strength=region.strength)
                for region in pww.regions
            ]
        )

    seed = pick_seed(request.seed)
    params = JobParams(
        version=3 if request.mask is not None else 1 if request.init_image is None else 2,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        n=request.n,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        seed=seed,
        sampler=request.sampler,
        inputs=sorted(inputs),
        paint_with_words=pww_params,
        sr_noise_level=request.sr_noise_level,
        use_karras_sigmas=request.use_karras_sigmas,
        width=width,
        height=height,
        strength=None if request.init_image is None else request.strength,
        padding_mask_crop=request.padding_mask_crop,
        response_format=request.response_format,
    ).model_dump(
        mode="json",
        exclude={"client"} | {k for k, v in (("width", width), ("height", height), ("strength", request.init_image),
                                             ("padding_mask_crop", request.padding_mask_crop)) if v is None},
    )
    return ValidatedJob(
        params=params, inputs=inputs, n=request.n, request_hash=request_fingerprint(params, request, inputs)
    )


def request_fingerprint(params: dict[str, Any], request: GenerationOptions, inputs: dict[str, bytes]) -> str:
    """Hash of what the client asked for (a server-picked seed excluded), for Idempotency-Key reuse checks."""
    canonical = {key: value for key, value in params.items() if key != "response_format"}
    if request.seed is None or request.seed == RANDOM_SEED:
        canonical["seed"] = None
    canonical["inputs"] = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(inputs.items())}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


_SIZE = re.compile(r"^([1-9][0-9]{0,5})x([1-9][0-9]{0,5})$")


def apply_size(
    request: OpenAIImagesRequest, settings: Settings, capabilities: ModelCapabilities
) -> OpenAIImagesRequest:
    """The request with the OpenAI ``size`` ("WIDTHxHEIGHT") as its width and height.

    ``size`` takes what width/height take (the model's multiples up to
    ``max_image_side``; a fixed-size model its size only), checked by the same
    rule but named ``size``. Sent with width/height that disagree, it is a 422
    naming both (neither is silently preferred). Raises ``RequestValidationError``.
    """
    if request.size is None:
        return request
    body: Loc = ("body",)
    match = _SIZE.match(request.size)
    if match is None:
        raise_invalid(
            [field_error(body + ("size",), 'must be "WIDTHxHEIGHT" in pixels, e.g. "1024x1024"', "size_format")]
        )
    width, height = int(match.group(1)), int(match.group(2))
    rule = capabilities.sizes
    problems = rule.errors(width, height, settings.max_image_side)
    if problems:
        if rule.fixed:
            message = f"this model makes {rule.default_width}x{rule.default_height} images only, got {request.size}"
        else:
            message = f"size {request.size}: " + "; ".join(f"{name} {text}" for name, text in problems.items())
        raise_invalid([field_error(body + ("size",), message, "unsupported_size")])
    conflicts = [
        (name, explicit)
        for name, value in (("width", width), ("height", height))
        if (explicit := getattr(request, name)) is not None and explicit != value
    ]
    if conflicts:
        sent = ", ".join(f"{name} {value}" for name, value in conflicts)
        message = f"size {request.size} disagrees with {sent}; send one of them, or values that agree"
        raise_invalid(
            [field_error(body + (name,), message, "size_conflict") for name in ("size", *(n for n, _ in conflicts))]
        )
    return request.model_copy(update={"width": width, "height": height})

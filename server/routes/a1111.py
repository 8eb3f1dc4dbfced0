"""The AUTOMATIC1111 (stable-diffusion-webui) API subset: ``POST /sdapi/v1/txt2img``,
``GET /sdapi/v1/samplers``, ``/schedulers``, ``/sd-models``, ``/options`` and ``/progress``,
``POST /sdapi/v1/interrupt``, so tools written against A1111's API
run unchanged against this server.

A txt2img body becomes a ``/generate`` request (``cfg_scale`` -> ``guidance_scale``, ``batch_size`` x
``n_iter`` -> ``n``, ``sampler_name`` + ``scheduler`` -> ``sampler`` + ``use_karras_sigmas``, seed -1:
random) and follows the same path (validation, limits, the queue, the synchronous wait); the answer
is A1111's ``{images, parameters, info}``, ``info`` a JSON string with ``seed``, ``all_seeds`` and
``infotexts``. Errors are the API's own (a 422 names A1111's field). A field A1111 uses to change the
image in a way this server does not (hires fix, face restoration, tiling, variation seeds, styles,
scripts, settings overrides) is a 422 naming it unless it has its default; A1111's bookkeeping fields
(saving, sending, task ids) are accepted and ignored; any other field is a 422.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, ImageFilter, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ediffi.spec import ANY_MODEL_SAMPLERS
from server.auth import PrincipalDep, authenticate
from server.deps import QueueDep
from server.queue import JobStatus, QueueUnavailable
from server.routes.generate import (
    COMMON_ERRORS,
    OffloadedJSONRoute,
    Submission,
    SubmissionDep,
    load_images,
    unsuccessful_answer,
)
from server.routes.jobs import AUTH_ERRORS, image_seeds
from server.schemas import GenerateRequest
from server.settings import Settings
from server.validation import decode_base64_image, field_error, open_image, raise_invalid

# Large bodies are JSON-decoded in a worker thread, as /generate's (one client's 10 MB body must not
# stall the event loop every other request and the health probes share).
router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], route_class=OffloadedJSONRoute)

#: A1111 sampler names served: (sampler, use_karras_sigmas with scheduler "Automatic"; None: the model's).
#: "Euler" and "DPM++ 2M" sample on the checkpoint's own sigmas as diffusers' schedulers do, which is
#: what A1111's "Automatic" scheduler means for them on a discrete checkpoint (close to, not equal to,
#: A1111's own k-diffusion discretisation); the shipped family has only Karras's schedule.
A1111_SAMPLERS: dict[str, tuple[str, bool | None]] = {
    "Euler": ("euler", False),
    "DPM++ 2M": ("dpmpp_2m", False),
    "DPM++ 2M Karras": ("dpmpp_2m", True),
    "Euler a": ("euler_a", False),
    "Heun": ("heun", True),
    # diffusers' DDIMScheduler, PNDMScheduler (PLMS) and DDPMScheduler on an imported checkpoint's own timesteps
    "DDIM": ("ddim", False),
    "PLMS": ("pndm", False),
    "DDPM": ("ddpm", False),
}
#: A1111 (>= 1.9) scheduler names served, lower-cased: "Automatic" keeps the sampler's own choice.
A1111_SCHEDULERS: dict[str, bool | None] = {"automatic": None, "karras": True}

#: Fields that change the image in ways this server does not: each must keep A1111's default.
_IMAGE_FIELDS_AT_DEFAULT: dict[str, Any] = {
    "enable_hr": False, "restore_faces": False, "tiling": False, "subseed_strength": 0, "styles": [],
    "alwayson_scripts": {}, "script_name": None, "script_args": [], "s_churn": 0,
    "refiner_checkpoint": None, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
}
_HINTS = {
    "enable_hr": "hires fix is not supported: ask for the size you want (width/height)",
    "restore_faces": "face restoration is not supported",
    "tiling": "tiling is not supported",
    "subseed_strength": "variation seeds are not supported",
    "styles": "A1111 styles are not supported: put the text in the prompt",
    "refiner_checkpoint": "import the refiner with the base instead (ediffi import diffusers BASE --refiner DIR)",
}
#: A1111 fields -> this API's, for error locations.
_FIELD_NAMES = {
    "guidance_scale": "cfg_scale", "n": "batch_size", "sampler": "sampler_name", "use_karras_sigmas": "scheduler",
    "init_image": "init_images", "strength": "denoising_strength",
}


class Txt2ImgRequest(BaseModel):
    """A1111's ``StableDiffusionTxt2ImgProcessingAPI`` fields (what its web UI and clients send)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older name of sampler_name
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    # Must keep their defaults (_IMAGE_FIELDS_AT_DEFAULT).
    enable_hr: bool = False
    restore_faces: bool | None = False
    tiling: bool | None = False
    subseed_strength: float = 0
    styles: list[str] | None = []
    override_settings: dict[str, Any] | None = {}
    alwayson_scripts: dict[str, Any] | None = {}
    script_name: str | None = None
    script_args: list[Any] | None = []
    s_churn: float | None = 0
    refiner_checkpoint: str | None = None
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    # Accepted and ignored: A1111 bookkeeping, or settings that only act with the features above.
    subseed: int = -1
    eta: float | None = None
    s_min_uncond: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    denoising_strength: float | None = None
    firstphase_width: int | None = None
    firstphase_height: int | None = None
    hr_scale: float | None = None
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = None
    hr_resize_x: int | None = None
    hr_resize_y: int | None = None
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    hr_additional_modules: list[Any] | None = None
    refiner_switch_at: float | None = None
    override_settings_restore_afterwards: bool | None = True
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    send_images: bool = True
    save_images: bool = False
    disable_extra_networks: bool | None = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    infotext: str | None = None
    firstpass_image: str | None = None


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's ``StableDiffusionImg2ImgProcessingAPI``: txt2img's fields, the init image and its mask."""

    init_images: list[str] = Field(min_length=1)
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0)  # A1111's default
    resize_mode: int = 0
    # Inpainting: white (or, with transparency, opaque) repaints; A1111's blur (4 px by default),
    # inversion, and the fields that must keep the one behaviour served (_unsupported_inpainting).
    mask: str | None = None
    mask_blur: int | None = Field(None, ge=0, le=64)
    mask_blur_x: int = Field(4, ge=0, le=64)
    mask_blur_y: int = Field(4, ge=0, le=64)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    inpainting_fill: int | None = None
    # "Only masked": diffusers' padding_mask_crop with A1111's padding
    inpaint_full_res: bool | None = None
    inpaint_full_res_padding: int = Field(0, ge=0, le=100_000)
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    # Accepted and ignored: the binarised latent mask is always rounded; bookkeeping.
    mask_round: bool | None = None
    image_cfg_scale: float | None = None
    include_init_images: bool | None = False

    @property
    def mask_blur_xy(self) -> tuple[int, int]:
        """A1111: ``mask_blur``, where sent, sets both directions."""
        return (self.mask_blur, self.mask_blur) if self.mask_blur is not None else (self.mask_blur_x, self.mask_blur_y)


def _unsupported_inpainting(body: Img2ImgRequest) -> list[dict[str, Any]]:
    """A1111's inpainting settings this server does not honour, each a 422 naming it."""
    problems = {
        "inpainting_fill": (body.inpainting_fill not in (None, 1),
                            "only 1 (original: the masked area starts from the init image, as diffusers') is supported"),
        "initial_noise_multiplier": (body.initial_noise_multiplier not in (None, 1.0), "only 1 is supported"),
        "latent_mask": (body.latent_mask is not None, "not supported: send the mask only"),
    }
    return [field_error(("body", name), why, "unsupported") for name, (refused, why) in problems.items() if refused]


def a1111_mask(value: str, invert: bool, blur: tuple[int, int], settings: Settings) -> str:
    """A1111's mask as this API's (white repaints, black keeps; base64 PNG): its alpha channel where it has
    transparency, else its grey level (A1111's create_binary_mask), inverted for
    ``inpainting_mask_invert``, then blurred by a Gaussian of ``blur`` pixels (x, y; A1111's mask_blur).
    The pipeline binarises it at 50%, as A1111 rounds its latent mask; A1111's pasting of the original
    pixels back outside the blurred mask is not done (diffusers' pipelines do not either)."""
    loc = ("body", "mask")
    data = decode_base64_image(value, loc, settings.max_image_bytes)
    with open_image(data, loc, settings.max_image_pixels, ("PNG", "JPEG")) as opened:
        if opened.mode == "RGBA" and opened.getextrema()[-1] != (255, 255):
            mask = opened.getchannel("A").point(lambda a: 255 if a > 128 else 0)
        else:
            mask = opened.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    if any(blur):
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


#: override_settings a tool may send that change nothing here: the served checkpoint (by its id),
#: and CLIP's last layer (the only one the imported encoders use where A1111's default applies).
_NEUTRAL_SETTINGS = {"CLIP_stop_at_last_layers": (1,)}


def _override_errors(settings: dict[str, Any] | None, served: str) -> list[dict[str, Any]]:
    errors = []
    for name, value in (settings or {}).items():
        if name == "sd_model_checkpoint":
            if value != served and str(value).split(" [")[0].removesuffix(".safetensors") != served:
                errors.append(field_error(("body", "override_settings", name),
                                          f"this server serves {served!r} only (GET /sdapi/v1/sd-models)", "unsupported"))
        elif value not in _NEUTRAL_SETTINGS.get(name, ()):
            errors.append(field_error(("body", "override_settings", name),
                                      "this setting is not supported (leave it out)", "unsupported"))
    return errors


def _unsupported(body: Txt2ImgRequest) -> list[dict[str, Any]]:
    errors = []
    for name, default in _IMAGE_FIELDS_AT_DEFAULT.items():
        value = getattr(body, name)
        if name.startswith("seed_resize_from_") and value <= 0:  # A1111 resizes only for positive sizes
            continue
        if value not in (default, None) and not (default in ([], {}) and not value):
            hint = _HINTS.get(name, "not supported by this server")
            errors.append(field_error(("body", name), f"{hint} (send {json.dumps(default)} or leave it out)", "unsupported"))
    return errors


def _sampling(body: Txt2ImgRequest, scheduler_sigmas: bool) -> dict[str, Any]:
    """sampler and use_karras_sigmas of the request (absent: the model's defaults)."""
    scheduler = (body.scheduler or "automatic").lower()
    if scheduler not in A1111_SCHEDULERS:
        raise_invalid([field_error(
            ("body", "scheduler"), f"{(body.scheduler or '')[:60]!r} is not served; choose Automatic or Karras",
            "unsupported",
        )])
    name = body.sampler_name or body.sampler_index
    field = "sampler_name" if body.sampler_name else "sampler_index"
    if name is None:  # the model's default sampler; Karras's sigmas if asked for
        return {"use_karras_sigmas": True} if scheduler_sigmas and A1111_SCHEDULERS[scheduler] else {}
    if name not in A1111_SAMPLERS:
        raise_invalid([field_error(
            ("body", field), f"{name[:60]!r} is not served; choose one of {', '.join(A1111_SAMPLERS)}", "unsupported",
        )])
    sampler, karras = A1111_SAMPLERS[name]
    if A1111_SCHEDULERS[scheduler] is not None:
        karras = A1111_SCHEDULERS[scheduler]
    fields: dict[str, Any] = {"sampler": sampler}
    # Only imported checkpoints have sigmas of their own; the shipped family's are Karras's whatever the name.
    if scheduler_sigmas:
        fields["use_karras_sigmas"] = True if sampler == "heun" else karras
    return fields


def _as_generate_request(body: Txt2ImgRequest, scheduler_sigmas: bool, extra: dict[str, Any]) -> GenerateRequest:
    fields: dict[str, Any] = {
        **extra,
        "prompt": body.prompt, "negative_prompt": body.negative_prompt, "n": body.batch_size * body.n_iter,
        "seed": body.seed, "steps": body.steps, "width": body.width, "height": body.height,
        "guidance_scale": None if body.cfg_scale is None else float(body.cfg_scale),
        **_sampling(body, scheduler_sigmas),
    }
    try:
        return GenerateRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise RequestValidationError(_a1111_locations(exc.errors())) from None


def _a1111_locations(errors: list[Any]) -> list[Any]:
    """The errors with this API's field names turned into A1111's (guidance_scale -> cfg_scale, ...)."""
    renamed = []
    for error in errors:
        loc = list(error.get("loc", ()))
        if len(loc) >= 2 and loc[0] == "body":
            loc[1] = _FIELD_NAMES.get(loc[1], loc[1])
        elif loc and isinstance(loc[0], str):
            loc = ["body", _FIELD_NAMES.get(loc[0], loc[0]), *loc[1:]]
        renamed.append({**error, "loc": loc})
    return renamed


def _infotext(
    prompt: str, negative: str, steps: int, sampler: str, cfg: float, seed: int, w: int, h: int, model: str,
    denoising_strength: float | None = None, mask_blur: tuple[int, int] | None = None,
) -> str:
    """A1111's "parameters" text, which its UI and PNG-info readers parse."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    line = f"Steps: {steps}, Sampler: {sampler}, CFG scale: {cfg:g}, Seed: {seed}, Size: {w}x{h}, Model: {model}"
    if denoising_strength is not None:
        line += f", Denoising strength: {denoising_strength:g}"
    if mask_blur is not None:
        line += f", Mask blur: {mask_blur[0]}" if mask_blur[0] == mask_blur[1] else f", Mask blur: {mask_blur[0]}x{mask_blur[1]}"
    lines.append(line)
    return "\n".join(lines)


_A1111_RESPONSES = {**AUTH_ERRORS, 504: {"description": "The job did not finish within sync_timeout_s"}, **COMMON_ERRORS}


@router.post("/txt2img", responses=_A1111_RESPONSES)
async def txt2img(body: Txt2ImgRequest, call: SubmissionDep) -> JSONResponse:
    """A1111's txt2img: waits for the images and answers ``{images, parameters, info}``."""
    return await _generate_and_answer(body, {}, call)


@router.post("/img2img", responses=_A1111_RESPONSES)
async def img2img(body: Img2ImgRequest, call: SubmissionDep) -> JSONResponse:
    """A1111's img2img: its one init image resized to width x height ("Just resize"),
    ``denoising_strength`` as diffusers' strength; with a ``mask``, inpainting ("original" fill; "Only
    masked" as diffusers' padding_mask_crop); imported latent models (SD, SDXL) only."""
    errors = []
    if len(body.init_images) != 1:
        errors.append(field_error(("body", "init_images"), "send exactly one init image (one batch of one image)", "unsupported"))
    if body.resize_mode != 0:
        errors.append(field_error(("body", "resize_mode"), "only 0 (Just resize) is supported", "unsupported"))
    if body.mask is not None:
        errors += _unsupported_inpainting(body)
    raise_invalid(errors)
    extra: dict[str, Any] = {"init_image": body.init_images[0], "strength": body.denoising_strength}
    if body.mask is not None:
        extra["mask"] = await run_in_threadpool(
            a1111_mask, body.mask, body.inpainting_mask_invert == 1, body.mask_blur_xy, call.settings
        )
        if body.inpaint_full_res:
            extra["padding_mask_crop"] = body.inpaint_full_res_padding
    return await _generate_and_answer(body, extra, call)


async def _generate_and_answer(body: Txt2ImgRequest, extra: dict[str, Any], call: Submission) -> JSONResponse:
    """Submit the A1111 request (``extra``: img2img's fields), wait for its images, answer A1111's shape."""
    principal, queue, settings, capabilities = call.principal, call.queue, call.settings, call.capabilities
    served = capabilities.id if capabilities is not None else "ediffi"
    raise_invalid(_unsupported(body) + _override_errors(body.override_settings, served))
    generate = _as_generate_request(body, scheduler_sigmas=bool(capabilities and capabilities.scheduler_sigmas), extra=extra)
    with call.wait_slots.hold(principal):
        try:
            record, _replayed = await call.submit(generate, "a1111")
        except RequestValidationError as exc:
            raise RequestValidationError(_a1111_locations(list(exc.errors()))) from None
        # For /progress and /interrupt on any API replica: the caller's latest wait.
        await queue.note_waiting(principal.limit_key, record.id, settings.sync_timeout_s + _WAIT_NOTE_MARGIN_S)
        try:
            final = await call.wait(record, settings.sync_timeout_s)
        finally:
            await _forget_wait(queue, principal.limit_key, record.id)
    unsuccessful = unsuccessful_answer(final, record, settings, unfinished_headers={}, finished_headers={})
    if unsuccessful is not None:
        return unsuccessful
    assert final is not None
    blobs = await load_images(queue, final)
    params = final.params
    seeds = image_seeds(final)
    model = served
    width = params.get("width") or (capabilities.sizes.default_width if capabilities else 0)
    height = params.get("height") or (capabilities.sizes.default_height if capabilities else 0)
    sampler_label = body.sampler_name or body.sampler_index or params["sampler"]
    strength = params.get("strength")
    mask_blur = body.mask_blur_xy if isinstance(body, Img2ImgRequest) and body.mask is not None else None
    infotexts = [
        _infotext(params["prompt"], params["negative_prompt"], params["steps"], sampler_label,
                  params["guidance_scale"], seed, width, height, model, strength, mask_blur)
        for seed in seeds
    ]
    info = {
        "prompt": params["prompt"], "all_prompts": [params["prompt"]] * len(seeds),
        "negative_prompt": params["negative_prompt"], "all_negative_prompts": [params["negative_prompt"]] * len(seeds),
        "seed": seeds[0] if seeds else params["seed"], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": width, "height": height, "sampler_name": sampler_label,
        "cfg_scale": params["guidance_scale"], "steps": params["steps"], "batch_size": body.batch_size,
        "restore_faces": False, "sd_model_name": model, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": strength, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(final.finished_at or time.time())),
        "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": "ediffi", "job_id": final.id,
    }
    return JSONResponse({
        "images": [base64.b64encode(blob).decode("ascii") for blob in blobs],
        # A1111 echoes its request; the init images (megabytes) are left out of the echo, as A1111 does
        "parameters": body.model_dump(mode="json", exclude={"init_images", "mask"}),
        "info": json.dumps(info),
    })


#: A caller's wait note outlives its synchronous wait by this much at most (then Redis drops it).
_WAIT_NOTE_MARGIN_S = 30.0


async def _forget_wait(queue, caller: str, job_id: str) -> None:
    """Best effort: with the queue unreachable the note expires on its own (its TTL)."""
    try:
        await queue.forget_waiting(caller, job_id)
    except QueueUnavailable:
        pass


_IDLE_STATE = {
    "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
    "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
}


@router.get("/progress")
async def progress(principal: PrincipalDep, queue: QueueDep) -> dict[str, Any]:
    """A1111's progress poll: the caller's txt2img or img2img now waiting (its latest, on whichever
    API replica: the queue records it), as A1111 reports it (``progress`` 0-1, ``eta_relative``
    seconds, ``state``); idle without one."""
    job_id = await queue.waiting_job(principal.limit_key)
    record = await queue.get(job_id) if job_id else None
    if record is None or record.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        return {"progress": 0.0, "eta_relative": 0.0, "state": _IDLE_STATE, "current_image": None, "textinfo": None}
    done = record.progress.step / record.progress.total if record.progress.total else 0.0
    elapsed = time.time() - record.started_at if record.started_at else 0.0
    eta = elapsed / done - elapsed if done > 0 else 0.0
    state = {
        **_IDLE_STATE, "job": f"task({record.id})", "job_count": 1,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(record.queued_at or time.time())),
        "sampling_step": record.progress.step, "sampling_steps": record.progress.total,
    }
    return {"progress": round(done, 4), "eta_relative": round(eta, 3), "state": state, "current_image": None,
            "textinfo": record.status.value}


@router.post("/interrupt")
async def interrupt(principal: PrincipalDep, queue: QueueDep) -> JSONResponse:
    """A1111's interrupt: cancels the caller's txt2img or img2img now waiting (on any API replica; its
    answer is then a 409); nothing else is touched, so one caller cannot stop another's work."""
    job_id = await queue.waiting_job(principal.limit_key)
    if job_id is not None:
        await queue.cancel(job_id)
    return JSONResponse({})


@router.get("/samplers", dependencies=[Depends(authenticate)])
async def samplers(request: Request) -> list[dict[str, Any]]:
    """The A1111 sampler names txt2img takes for the served model (DDIM, PLMS and DDPM: imported checkpoints)."""
    capabilities = request.app.state.capabilities
    served = set(capabilities.samplers) if capabilities is not None else set(ANY_MODEL_SAMPLERS)
    return [{"name": name, "aliases": [], "options": {}} for name, (sampler, _) in A1111_SAMPLERS.items() if sampler in served]


@router.get("/schedulers", dependencies=[Depends(authenticate)])
async def schedulers() -> list[dict[str, Any]]:
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]


@router.get("/options", dependencies=[Depends(authenticate)])
async def options(request: Request) -> dict[str, Any]:
    """The A1111 settings tools read at start (the loaded checkpoint, CLIP's last layer, the image format)."""
    capabilities = request.app.state.capabilities
    return {
        "sd_model_checkpoint": capabilities.id if capabilities is not None else "ediffi",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
    }


@router.get("/sd-models", dependencies=[Depends(authenticate)])
async def sd_models(request: Request) -> list[dict[str, Any]]:
    """The served model, as A1111 lists checkpoints (no file names: paths stay on the server)."""
    capabilities = request.app.state.capabilities
    name = capabilities.id if capabilities is not None else "ediffi"
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": "", "config": None}]

"""HTTP request/response models (pydantic v2), exactly the public interface of docs/architecture.md §4,
and :class:`JobParams`, the JSON the API puts on the queue for the worker.

The static bounds here are the hard ones (types, enums, ranges that never
change). Limits that come from :class:`~server.settings.Settings` (prompt
length, ``n``, ``steps``, regions, image bytes and pixels) are enforced by
:mod:`server.validation` with the same field-level error format, and are
patched into the OpenAPI schema by :func:`server.app.create_app`.

Numbers are strict: ``"n": "2"``, ``"n": 2.0`` or ``"n": true`` are rejected,
not coerced; floats must be finite. Both endpoints reject unknown fields (a
typo such as ``"stpes"``, or diffusers' ``num_inference_steps``, is a 422, not
silently ignored); ``/v1/images/generations`` takes OpenAI's own fields that do
not change the image (``quality``, ``style``, ``user``, ``moderation``) and refuses
the values it cannot honour (``output_format`` other than png, ``stream: true``,
``background: "transparent"``).
"""

from __future__ import annotations

import unicodedata

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, InitErrorDetails, PydanticCustomError

from ediffi.failure import FailureKind
from ediffi.spec import (
    DEFAULT_INIT_STRENGTH,
    DEFAULT_STRENGTH,
    HEX_COLOR_PATTERN,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_STRENGTH,
    RANDOM_SEED,
    SamplerName,
)

ResponseFormat = Literal["b64_json", "url"]


def _utf8_text(value: str) -> str:
    """Reject strings that cannot be encoded as UTF-8 (lone surrogates such as ``"\\ud800"``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


Text = Annotated[str, Field(strict=True), AfterValidator(_utf8_text)]


# Letters and symbols drawn as nothing: the Hangul fillers and the blank Braille pattern.
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _visible(ch: str) -> bool:
    """A letter, digit, punctuation mark or symbol that shows (not a space, control or format character,
    lone combining mark, or blank glyph)."""
    return unicodedata.category(ch)[0] in "LNPS" and ch not in _BLANK_GLYPHS


def _non_blank(value: str) -> str:
    if not any(_visible(ch) for ch in value):
        raise ValueError("must not be empty or only whitespace or invisible characters")
    return value


# --------------------------------------------------------------------- requests


class NullMeansDefault(BaseModel):
    """A request model in which JSON null for a field with a default means that default, as in
    OpenAI's API (its clients send null for an explicit None: ``n=None``, ``response_format=None``)
    and diffusers' (``negative_prompt=None``). ``/openapi.json`` shows those fields nullable."""

    @classmethod
    def _null_means_default(cls, name: str) -> bool:
        field = cls.model_fields.get(name)
        return field is not None and not field.is_required() and field.default is not None

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls_of_defaulted_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None or not cls._null_means_default(key)}
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        properties = handler.resolve_ref_schema(schema).get("properties", {})
        for name, prop in properties.items():
            if cls._null_means_default(name):
                # Title, description and default stay on the property; its type becomes "that, or null".
                kept = {key: prop.pop(key) for key in ("title", "description", "default", "examples") if key in prop}
                properties[name] = {"anyOf": [prop, {"type": "null"}], **kept}
        return schema


class PaintRegion(NullMeansDefault):
    """One painted region: pixels of ``color`` in the colour map are where ``phrase`` goes."""

    model_config = ConfigDict(extra="forbid")

    color: Annotated[
        str,
        Field(
            strict=True,
            pattern=HEX_COLOR_PATTERN,
            description='Exact colour of the region in the colour map, "#rrggbb".',
            examples=["#ff0000"],
        ),
    ]
    phrase: Annotated[
        Text,
        AfterValidator(_non_blank),
        Field(min_length=1, description="Words of the prompt painted in this region (whole words, any case)."),
    ]
    strength: Annotated[
        float,
        Field(
            strict=True,
            ge=0.0,
            le=MAX_STRENGTH,
            allow_inf_nan=False,
            description="Paint-with-words strength w' of this region, in [0, 10].",
        ),
    ] = DEFAULT_STRENGTH


class PaintWithWords(BaseModel):
    """Paint-with-words (eDiff-I §4.3): a colour map and the regions painted on it."""

    model_config = ConfigDict(extra="forbid")

    color_map: Annotated[
        str,
        Field(
            strict=True,
            min_length=1,
            description="Base64 PNG (optionally a data: URL), square like the canvas; regions are exact colours.",
        ),
    ]
    regions: Annotated[list[PaintRegion], Field(min_length=1, description="Regions, each a distinct colour.")]


class GenerationOptions(NullMeansDefault):
    """Fields shared by ``POST /generate`` and ``POST /v1/images/generations`` (where most are extensions)."""

    prompt: Annotated[Text, AfterValidator(_non_blank), Field(min_length=1, description="What to draw.")]
    n: Annotated[int, Field(strict=True, ge=1, description="Number of images.")] = 1
    negative_prompt: Annotated[Text, Field(description="Text the image should not show (guidance's negative).")] = ""
    steps: Annotated[
        int | None,
        Field(strict=True, ge=1, description="Sampling steps. Absent: the model's default (GET /v1/models: request.steps)."),
    ] = None
    guidance_scale: Annotated[
        float | None,
        Field(
            strict=True, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
            description="Classifier-free guidance scale; at most 1 (e.g. 0) turns guidance off: the prompt's "
            "prediction alone, as diffusers' pipelines. Absent: the model's default (GET /v1/models).",
        ),
    ] = None
    seed: Annotated[
        int | None,
        Field(
            strict=True,
            ge=RANDOM_SEED,
            le=MAX_SEED,
            description="Seed of the first image; image k uses seed + k, so seed + n - 1 must be at most "
            f"{MAX_SEED}. Absent or {RANDOM_SEED} (A1111's random): the server picks one (each image's is in the answer).",
        ),
    ] = None
    sampler: Annotated[
        SamplerName | None,
        Field(
            description="heun, euler, dpmpp_2m, euler_a (Euler ancestral, A1111's \"Euler a\": its noise comes from "
            "the seed), unipc (diffusers' UniPCMultistepScheduler): on the Karras sigma schedule, or an imported checkpoint's own sigmas; ddim, pndm (PLMS), ddpm: "
            "diffusers' DDIMScheduler, PNDMScheduler and DDPMScheduler on an imported checkpoint's own timesteps. Absent: the "
            "model's default (GET /v1/models: samplers, request.sampler)."
        ),
    ] = None
    style_image: Annotated[
        str | None,
        Field(strict=True, min_length=1, description="Base64 PNG or JPEG (optionally a data: URL) used as style."),
    ] = None
    paint_with_words: PaintWithWords | None = None
    init_image: Annotated[
        str | None,
        Field(
            strict=True, min_length=1,
            description="img2img (imported latent models: GET /v1/models init_image): base64 PNG or JPEG (optionally "
            "a data: URL) to start from, as diffusers' img2img pipelines' image. It is resized to width x height "
            "where they are given; absent, they are its size rounded down to the model's multiple.",
        ),
    ] = None
    strength: Annotated[
        float | None,
        Field(
            strict=True, gt=0.0, le=1.0, allow_inf_nan=False,
            description="With init_image: how much of the schedule runs, diffusers' strength (A1111's denoising_"
            "strength): int(steps x strength) steps from the init image noised to that level; 1 ignores the image's "
            f"content but its size. Absent: {DEFAULT_INIT_STRENGTH}, or with a mask the model's inpainting default "
            "(GET /v1/models request.strength.default_with_mask: its diffusers inpaint pipeline's, 1; SDXL's 0.9999).",
        ),
    ] = None
    mask: Annotated[
        str | None,
        Field(
            strict=True, min_length=1,
            description="Inpainting, with init_image (GET /v1/models mask): base64 PNG or JPEG (optionally a data: "
            "URL) of the init image's size; white (>= 50% grey) is repainted, black kept, as diffusers' inpaint "
            "pipelines' mask_image and A1111's mask.",
        ),
    ] = None
    padding_mask_crop: Annotated[
        int | None,
        Field(
            strict=True, ge=0, le=100_000,
            description="With a mask: inpaint only the region around it (diffusers' padding_mask_crop, A1111's "
            "'only masked'): the box holding the mask's pixels, padded by this many pixels and grown to "
            "width:height, is cropped, resized to width x height, inpainted and pasted back into the init image, "
            "whose size the images then take.",
        ),
    ] = None
    sr_noise_level: Annotated[
        int | None,
        Field(
            strict=True,
            ge=0,
            description="Models with a noise-level super-resolution stage (DeepFloyd IF stage II): the noise level "
            "of the upsampled low-res image, in timesteps of its image-noising schedule (diffusers' noise_level; "
            "below the schedule's length). Absent: the pipeline's default (250 for IF).",
        ),
    ] = None
    use_karras_sigmas: Annotated[
        bool | None,
        Field(
            strict=True,
            description="Imported checkpoints with sampler euler, dpmpp_2m, euler_a or unipc: false samples on the "
            "scheduler's own sigmas, as diffusers' EulerDiscreteScheduler, DPMSolverMultistepScheduler, "
            "EulerAncestralDiscreteScheduler and UniPCMultistepScheduler by default (diffusers' use_karras_sigmas); true: Karras's. ddim, "
            "pndm and ddpm always step their own timesteps (false). Absent: the model's default with its default sampler, "
            "false with ddim, pndm or ddpm, else true (GET /v1/models: request.use_karras_sigmas; null there: Karras's only).",
        ),
    ] = None
    width: Annotated[
        int | None,
        Field(strict=True, ge=1, description="Image width in pixels (GET /v1/models: sizes). Absent: the model's default."),
    ] = None
    height: Annotated[
        int | None,
        Field(strict=True, ge=1, description="Image height in pixels (GET /v1/models: sizes). Absent: the model's default."),
    ] = None
    response_format: Annotated[
        ResponseFormat, Field(description="b64_json: images inline; url: links to /jobs/{id}/images/{k}.png.")
    ] = "b64_json"


class GenerateRequest(GenerationOptions):
    """Body of ``POST /generate``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "a red circle on the left", "n": 1, "seed": 7}]},
    )


#: Fields other image APIs name differently, and what this endpoint calls them.
_FIELD_HINTS = {
    "num_inference_steps": "steps", "num_images_per_prompt": "n", "guidance": "guidance_scale",
    "cfg_scale": "guidance_scale", "sampler_name": "sampler", "scheduler": "sampler", "noise_level": "sr_noise_level",
}


def _only(*allowed: Any, why: str) -> AfterValidator:
    """Absent (None) or one of ``allowed``; another value OpenAI's API takes is refused, saying ``why``."""

    def check(value: Any) -> Any:
        if value is not None and value not in allowed:
            raise PydanticCustomError("unsupported_value", why)
        return value

    return AfterValidator(check)


class OpenAIImagesRequest(GenerationOptions):
    """Body of ``POST /v1/images/generations``: the OpenAI subset plus the /generate fields as extensions."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "a red circle on the left", "n": 1, "size": "64x64"}]},
    )

    @model_validator(mode="wrap")
    @classmethod
    def _say_what_an_unknown_field_is_called_here(cls, data: Any, handler: Any) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            if not any(error["type"] == "extra_forbidden" for error in exc.errors()):
                raise
            errors: list[InitErrorDetails] = []
            for error in exc.errors():  # each as it was (type, message, ctx), an unknown field's message replaced
                message, name = error["msg"], error["loc"][-1] if error["loc"] else None
                if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
                    hint = f"use {_FIELD_HINTS[name]!r}; " if name in _FIELD_HINTS else ""
                    message = (f"not a field of this endpoint ({hint}it takes OpenAI's fields and, as extensions, "
                               "/generate's: prompt, n, size, response_format, steps, guidance_scale, seed, ...)")
                custom = PydanticCustomError(error["type"], message, error.get("ctx"))
                errors.append(InitErrorDetails(type=custom, loc=error["loc"], input=error["input"]))
            raise ValidationError.from_exception_data(exc.title, errors) from None

    size: Annotated[
        str | None,
        Field(
            strict=True,
            description='"WIDTHxHEIGHT", e.g. "1792x1024": any size width/height take (GET /v1/models: sizes, '
            "max_side; a fixed-size model its size only). With width/height, they must agree. Absent: the "
            "model's default.",
        ),
    ] = None
    response_format: Annotated[
        ResponseFormat,
        Field(
            description="url (the OpenAI default): links to /jobs/{id}/images/{k}.png, relative unless the server "
            "sets EDIFFI_PUBLIC_BASE_URL (then absolute); unlike OpenAI's pre-signed URLs, fetching one needs the "
            "request's API key when keys are configured, and it expires after EDIFFI_RESULT_TTL_S. "
            "b64_json: images inline.",
        ),
    ] = "url"
    model: Annotated[
        str | None,
        Field(
            strict=True,
            description="The served model's id (GET /v1/models), OpenAI's own image model names (dall-e-*, "
            "gpt-image-*: the served model, so code written for OpenAI runs unchanged), or absent; any other id "
            "is a 404 model_not_found.",
        ),
    ] = None
    quality: Annotated[
        Literal["standard", "hd", "low", "medium", "high", "auto"] | None,
        Field(description="OpenAI's; accepted and ignored (steps sets the effort here)."),
    ] = None
    style: Annotated[
        Literal["vivid", "natural"] | None, Field(description="OpenAI's (dall-e-3); accepted and ignored.")
    ] = None
    user: Annotated[Text | None, Field(description="OpenAI's end-user id; accepted and ignored.")] = None
    moderation: Annotated[
        Literal["low", "auto"] | None, Field(description="OpenAI's; accepted and ignored.")
    ] = None
    background: Annotated[
        Literal["transparent", "opaque", "auto"] | None,
        _only("auto", "opaque", why="transparent backgrounds are not made here: the images are opaque; send auto or "
              "opaque, or omit it"),
        Field(description="auto or opaque (the images are opaque); transparent is a 422."),
    ] = None
    output_format: Annotated[
        Literal["png", "jpeg", "webp"] | None,
        _only("png", why="only PNG is made here; send png or omit it"),
        Field(description="png only (jpeg and webp are a 422)."),
    ] = None
    stream: Annotated[
        bool | None,
        Field(strict=True, description="false only (streaming partial images is not offered; true is a 422)."),
        _only(False, why="streaming is not offered here; send false or omit it"),
    ] = None


class OpenAIImageEditForm(BaseModel):
    """The text fields of ``POST /v1/images/edits`` (multipart/form-data, as OpenAI's; its files are
    ``image`` and ``mask``), read from text as a form sends them ("2" is 2) and then checked as
    ``/v1/images/generations``' body. OpenAI's fields, and /generate's as extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to draw in the edited region.")
    n: int | None = None
    size: str | None = Field(None, description='"WIDTHxHEIGHT"; absent: the image\'s size (rounded down to the model\'s multiple).')
    response_format: str | None = Field(None, description="url (default) or b64_json.")
    model: str | None = None
    user: str | None = None
    quality: str | None = None
    background: str | None = None
    output_format: str | None = None
    stream: bool | None = None
    input_fidelity: Literal["high", "low"] | None = Field(None, description="OpenAI's; accepted and ignored.")
    output_compression: int | None = Field(None, ge=0, le=100, description="OpenAI's (jpeg/webp); accepted and ignored.")
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None
    strength: float | None = Field(None, description="Absent: the model's inpainting default (GET /v1/models "
                                   "request.strength.default_with_mask; 1: the masked region from pure noise).")
    padding_mask_crop: int | None = Field(None, description="Inpaint the region around the mask only (as /generate's).")
    use_karras_sigmas: bool | None = None

    #: OpenAI's fields that change nothing here (not passed on).
    IGNORED: ClassVar[frozenset[str]] = frozenset({"input_fidelity", "output_compression"})


# -------------------------------------------------------------------- job params


class JobRegion(BaseModel):
    color: str  # lower-case "#rrggbb", present in the colour map
    phrase: str  # occurs in the prompt as whole words (case-insensitive)
    strength: float  # [0, 10]


class JobPaintWithWords(BaseModel):
    regions: list[JobRegion]  # the colour map itself is the input "color_map" (PNG bytes)


class JobClient(BaseModel):
    """API bookkeeping; the worker ignores it."""

    owner: str | None = None  # hash of the API key that submitted the job (None without keys)
    submission_id: str  # unique per accepted HTTP submission (tells a new job from an idempotent replay)
    request_hash: str  # fingerprint of the request (an Idempotency-Key reused with another body is a 422)
    api: Literal["generate", "openai", "a1111"] = "generate"


class JobParams(BaseModel):
    """What the API puts on the queue for each job (``JobRecord.params``): the validated request.

    Schema version 1, exact keys (version 2: the same keys, for a job with an ``init_image``:
    a worker that knows only version 1 refuses it rather than drawing it as txt2img)::

        {
          "version": 1 | 2,
          "prompt": str,                    # non-blank, <= max_prompt_chars
          "negative_prompt": str,           # "" when absent
          "n": int,                         # 1..max_n images
          "steps": int,                     # 1..max_steps
          "guidance_scale": float,          # finite, [0, 50]; <= 1: guidance off (conditional rows only)
          "seed": int,                      # always set (picked by the API if the client sent none);
                                            # image k must use seed + k (GenerationRequest.image_seeds),
                                            # seed + n - 1 <= MAX_SEED
          "sampler": "heun" | "euler" | "dpmpp_2m" | "euler_a" | "unipc" | "ddim" | "pndm" | "ddpm",
          "inputs": ["color_map"?, "init_image"?, "mask"?, "style_image"?],   # the job's byte inputs, sorted
          "paint_with_words": null | {"regions": [{"color": "#rrggbb", "phrase": str, "strength": float}]},
          "sr_noise_level": null | int,     # >= 0; the model checks its range (IF stage II)
          "use_karras_sigmas": bool,        # false: imported model, the scheduler's own sigmas (ddim/pndm/ddpm: always)
          "width"?: int, "height"?: int,    # only when the client asked for a size (width/height, or
                                            # /v1/images/generations' size) or sent an init_image, else the default
          "strength"?: float,               # (0, 1]; only with the "init_image" input (img2img, inpainting)
          "padding_mask_crop"?: int,        # >= 0; only with the "mask" input: inpaint the region around it
          "response_format": "b64_json" | "url",      # how the API will answer; not the worker's concern
          "client": {"owner": str | null, "submission_id": str, "request_hash": str,
                     "api": "generate" | "openai" | "a1111"}  # API bookkeeping; the worker ignores it
        }

    Byte inputs (``JobQueue.load_input(job_id, name)``; names also in ``ClaimedJob.input_names``):

    * ``"style_image"``: the client's PNG or JPEG bytes, already checked to decode
      and to be within ``max_image_bytes`` / ``max_image_pixels``;
    * ``"color_map"``: PNG bytes, square, every region colour present in it
      (exact RGB match after ``convert("RGB")``), colours distinct;
    * ``"init_image"``: PNG or JPEG bytes as ``style_image``'s (img2img; the params then carry
      ``width``, ``height`` and ``strength``);
    * ``"mask"``: PNG or JPEG bytes of the init image's size (inpainting: white repaints, black keeps).

    ``version``: 1, or 2 for a job with an init image, 3 with a mask: a worker from before either
    fails the job (its JobParams refuses the version) instead of drawing it as another kind of job.

    The worker builds ``ediffi.pipeline.GenerationRequest(prompt=..., negative_prompt=...,
    steps=..., guidance_scale=..., seed=..., sampler=..., n=..., style_image=PIL image or None,
    color_map=PIL image or None, regions=[Region(color, phrase, strength), ...])`` and reports
    the seeds it used (``seed + k``) to ``JobQueue.complete``. Input that passes the API
    but that the model still rejects (e.g. a phrase the tokenizer truncated away) should be
    failed with a reason starting ``"invalid_input: <field>: <message>"``: the synchronous
    endpoints turn that into a 422 naming the field.
    """

    model_config = ConfigDict(extra="ignore")

    version: Literal[1, 2, 3] = 1
    prompt: str
    negative_prompt: str = ""
    n: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: SamplerName
    inputs: list[str] = Field(default_factory=list)
    paint_with_words: JobPaintWithWords | None = None
    sr_noise_level: int | None = None
    use_karras_sigmas: bool = True
    width: int | None = None
    height: int | None = None
    strength: float | None = None
    padding_mask_crop: int | None = None
    response_format: ResponseFormat = "b64_json"
    client: JobClient | None = None

    @property
    def image_seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.n)]


# -------------------------------------------------------------------- responses


class ImageOut(BaseModel):
    b64_json: str | None = Field(default=None, description="Base64 PNG (response_format b64_json).")
    url: str | None = Field(default=None, description="Where to GET the PNG (response_format url).")
    seed: int = Field(description="Seed this image was sampled with.")


class ImageLink(BaseModel):
    url: str = Field(description="Where to GET the PNG.")
    seed: int = Field(description="Seed this image was sampled with.")


class GenerateResponse(BaseModel):
    """200 body of a synchronous ``POST /generate``."""

    id: str
    status: Literal["succeeded", "canceled"]
    images: list[ImageOut]
    timings: dict[str, float] = Field(
        description="queued_at/started_at/finished_at (epoch s), queue_wait_s, run_s, total_s, worker timings."
    )


class JobLinks(BaseModel):
    self: str
    events: str
    cancel: str


class JobAccepted(BaseModel):
    """202 body of ``POST /generate`` with ``Prefer: respond-async`` (or a sync wait that timed out)."""

    id: str
    status: str
    links: JobLinks


class Progress(BaseModel):
    step: int
    total: int


class FailureView(BaseModel):
    """Why a job failed: a stable ``kind`` and a message written for the client."""

    kind: FailureKind
    message: str
    field: str | None = Field(default=None, description="The request field at fault (invalid_input).")


class JobView(BaseModel):
    """``GET /jobs/{id}``."""

    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    progress: Progress
    n: int
    error: str | None = None
    failure: FailureView | None = None
    images: list[ImageLink] = Field(default_factory=list, description="Links to the images once succeeded.")
    timings: dict[str, float]
    links: JobLinks


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class ErrorMessage(BaseModel):
    """Body of the non-validation errors (401, 403, 404, 409, 429, 500, 503, 504)."""

    detail: str
    kind: FailureKind | None = Field(default=None, description="A failed job's failure kind (see FailureView).")


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What went wrong; a field error starts with the field's name.")
    type: str = Field(description="invalid_request_error (4xx), rate_limit_error (429) or server_error (5xx).")
    param: str | None = Field(description="The request field at fault, dotted (e.g. paint_with_words.regions[0].phrase).")
    code: str | None = Field(
        description="Machine-readable reason: the validation error's type (422), a failed job's failure kind, "
        "model_not_found, or one per status (e.g. invalid_api_key, rate_limit_exceeded)."
    )


class OpenAIError(BaseModel):
    """Body of every error on ``/v1/*``: OpenAI's shape (its clients read ``error.message``)."""

    error: OpenAIErrorDetail


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str
    input: Any | None = None
    ctx: dict[str, Any] | None = None


class FieldErrors(BaseModel):
    """Body of 413 and 422: FastAPI's field-level format, ``loc`` names the field."""

    detail: list[FieldError]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    workers_alive: int | None = None
    queue_depth: int | None = None
    reason: str | None = None

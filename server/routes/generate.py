"""Creating jobs: ``POST /generate`` and the OpenAI-compatible ``POST /v1/images/generations``.

Both validate the request (:mod:`server.validation`), put it on the queue as
:class:`~server.schemas.JobParams` plus byte inputs, and by default wait for
the job (up to ``sync_timeout_s``). ``POST /generate`` with
``Prefer: respond-async`` answers 202 at once instead.

Outcomes of a synchronous wait:

========================= ===================== =================================
job                       /generate             /v1/images/generations
========================= ===================== =================================
succeeded                 200 images            200 ``{created, data}``
canceled (by a cancel)    200 status canceled   409
failed, ``invalid_input`` 422 naming the field  422 naming the field
failed, other kind        status by kind         status by kind
still running at timeout  202 with links        504 with the job's URL
========================= ===================== =================================

A failed job's status comes from its failure kind: 503 with ``Retry-After``
for ``out_of_memory`` and ``lost``, 504 for ``timeout``, 500 for
``internal`` and ``max_deliveries``; the body is ``{detail, kind}``.

Every answer of ``/v1/images/generations`` about a job it already queued (504, 409, a
failed job's status, the 503 of an accepted job) carries ``x-should-retry: false``:
OpenAI's clients resend every 5xx and 409 otherwise, without an ``Idempotency-Key``,
so each retry was a new job (and a canceled job's retry came back as a success).
Under an ``Idempotency-Key`` a resend is the same job, so the answers about one
still unfinished (504, the 503 of an accepted job) leave the client free to retry.

A synchronous client that disconnects cancels its job, unless it sent an
``Idempotency-Key`` (it may come back for the result). A synchronous wait takes
one of the caller's ``max_streams_per_key`` slots before the job is queued (429
with ``Retry-After`` when none is free, and nothing is queued).

Image URLs of the OpenAI endpoint are ``public_base_url`` + path, or the bare
path when no public URL is configured; never built from the request's ``Host``.

Large bodies are JSON-decoded in a worker thread (:class:`OffloadedJSONRoute`),
so a few big uploads do not stall the event loop (and the health probes).

``Idempotency-Key`` (1-255 visible ASCII characters, scoped to the API key):
a repeat returns the same job (header ``Idempotent-Replayed: true``); reusing
a key with a different request is a 422 naming the header.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
import uuid
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Header, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from server.auth import Principal, SubmitterDep, WaitSlotsDep
from ediffi.capabilities import ModelCapabilities
from server.deps import MetricsDep, QueueDep, SettingsDep
from ediffi.failure import Failure, FailureKind, field_loc
from server.metrics import Metrics
from server.middleware import form_data_refusal
from server.queue import JobQueue, JobRecord, JobStatus, QueueUnavailable
from server.routes.jobs import (
    AUTH_ERRORS,
    UNAVAILABLE,
    ClientDisconnected,
    accepted_job_unavailable,
    image_path,
    image_seeds,
    job_links,
    job_timings,
    wait_for_terminal,
)
from server.schemas import (
    ErrorMessage,
    FieldErrors,
    GenerateRequest,
    GenerateResponse,
    GenerationOptions,
    ImageOut,
    JobAccepted,
    JobClient,
    OpenAIError,
    OpenAIImage,
    OpenAIImageEditForm,
    OpenAIImagesRequest,
    OpenAIImagesResponse,
)
from server.settings import Settings
from server.validation import (
    PayloadTooLarge, ValidatedJob, apply_size, field_error, open_image, raise_invalid, validate_generation,
)

#: Bodies up to this size are JSON-decoded on the event loop (cheaper than a thread hop).
INLINE_JSON_BYTES = 64 * 1024


class OffloadedJSONRequest(Request):
    """A request whose large JSON body is decoded in a worker thread, off the event loop."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await run_in_threadpool(json.loads, body) if len(body) > INLINE_JSON_BYTES else json.loads(body)
        return self._json


class OffloadedJSONRoute(APIRoute):
    """FastAPI's route, handing the endpoint an :class:`OffloadedJSONRequest` (FastAPI's documented hook)."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def offloaded_handler(request: Request) -> Any:
            return await handler(OffloadedJSONRequest(request.scope, request.receive))

        return offloaded_handler


router = APIRouter(tags=["generation"], responses={**AUTH_ERRORS}, route_class=OffloadedJSONRoute)

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")

COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": FieldErrors, "description": "An image or the body is too large"},
    422: {"model": FieldErrors, "description": "Invalid input; loc names the field"},
    415: {"model": ErrorMessage, "description": "The body is not sent as application/json"},
    429: {
        "model": ErrorMessage,
        "description": "Queue full, rate limit exceeded, or too many open waits of this caller; see Retry-After",
    },
    500: {"model": ErrorMessage, "description": "The job failed on the worker"},
    **UNAVAILABLE,
}


def in_openai_shape(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` whose bodies are :class:`OpenAIError`: ``/v1/*`` answers errors in OpenAI's shape."""
    return {code: {**doc, "model": OpenAIError} for code, doc in responses.items()}


PreferHeader = Annotated[
    str | None,
    Header(alias="Prefer", description="respond-async: answer 202 at once; wait=N: wait at most N seconds"),
]
IdempotencyHeader = Annotated[
    str | None, Header(alias="Idempotency-Key", description="Repeat-safe key: the same job for a repeated request")
]


# -------------------------------------------------------------------- helpers


_DELTA_SECONDS = re.compile(r"^[0-9]{1,9}(\.[0-9]+)?$")


def parse_prefer(prefer: str | None) -> tuple[bool, float | None]:
    """(respond-async asked, wait seconds asked) from an RFC 7240 ``Prefer`` header."""
    if not prefer:
        return False, None
    respond_async, wait = False, None
    for part in re.split(r"[,;]", prefer):
        token, equals, value = part.strip().partition("=")
        token, value = token.strip().lower(), value.strip().strip('"')
        if token == "respond-async" and not equals:  # it takes no value: "respond-async=false" is not it
            respond_async = True
        elif token == "wait" and _DELTA_SECONDS.match(value):  # RFC 7240: delta-seconds (no nan, inf, -1)
            wait = float(value)
    return respond_async, wait


def scoped_idempotency_key(key: str | None, principal: Principal) -> str | None:
    """The queue-side key: the client's key scoped to its caller (the API key; anonymous: the client
    address, so one address cannot replay or probe another's), hashed to a fixed length."""
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(key):
        raise_invalid(
            [field_error(("header", "idempotency-key"), "must be 1-255 visible ASCII characters", "idempotency_key")]
        )
    return hashlib.sha256(f"{principal.limit_key}\n{key}".encode()).hexdigest()


async def submit_job(
    body: GenerationOptions,
    *,
    api: str,
    principal: Principal,
    queue: JobQueue,
    settings: Settings,
    metrics: Metrics,
    idempotency_key: str | None,
    capabilities: ModelCapabilities | None = None,
) -> tuple[JobRecord, bool]:
    """Validate and enqueue; returns (record, replayed). `capabilities`: the
    loaded model's, for the fields only some models take (size, style)."""
    queue_key = scoped_idempotency_key(idempotency_key, principal)
    heavy = body.style_image is not None or body.init_image is not None or body.paint_with_words is not None
    if heavy:  # image decoding: off the event loop
        validated: ValidatedJob = await run_in_threadpool(validate_generation, body, settings, capabilities)
    else:
        validated = validate_generation(body, settings, capabilities)
    client = JobClient(
        owner=principal.key_id, submission_id=uuid.uuid4().hex, request_hash=validated.request_hash, api=api
    )
    params = {**validated.params, "client": client.model_dump(mode="json")}
    # The unfinished-jobs cap counts per caller as the rate limit does: per key, or per client address when
    # anonymous (with key_id, every anonymous caller shared one budget that one address could fill).
    record = await queue.submit(
        params, validated.inputs, validated.n, idempotency_key=queue_key, owner=principal.limit_key
    )
    stored_client = record.params.get("client") or {}
    replayed = stored_client.get("submission_id") != client.submission_id
    if replayed and stored_client.get("request_hash") != validated.request_hash:
        raise_invalid(
            [
                field_error(
                    ("header", "idempotency-key"),
                    "this Idempotency-Key was used for a different request",
                    "idempotency_key_reused",
                )
            ]
        )
    if not replayed:
        metrics.jobs_submitted.inc()
    return record, replayed


#: The HTTP status a synchronous request answers for each kind of job failure.
_STATUS_BY_FAILURE: dict[FailureKind, int] = {
    FailureKind.INVALID_INPUT: status.HTTP_422_UNPROCESSABLE_CONTENT,
    FailureKind.CANCELED: status.HTTP_409_CONFLICT,
    FailureKind.TIMEOUT: status.HTTP_504_GATEWAY_TIMEOUT,
    FailureKind.OUT_OF_MEMORY: status.HTTP_503_SERVICE_UNAVAILABLE,
    FailureKind.LOST: status.HTTP_503_SERVICE_UNAVAILABLE,
    FailureKind.MAX_DELIVERIES: status.HTTP_500_INTERNAL_SERVER_ERROR,
    FailureKind.INTERNAL: status.HTTP_500_INTERNAL_SERVER_ERROR,
}
# Transient failures: the same request may well succeed when sent again a little later.
_RETRY_AFTER_S = {FailureKind.OUT_OF_MEMORY: 10, FailureKind.LOST: 1}


class Submission:
    """What every generating route (/generate, /v1/images/generations, A1111's) takes, injected by
    FastAPI: the request, its caller, the queue, the settings, the metrics, the caller's wait slots
    and its Idempotency-Key."""

    def __init__(
        self,
        request: Request,
        principal: SubmitterDep,
        queue: QueueDep,
        settings: SettingsDep,
        metrics: MetricsDep,
        wait_slots: WaitSlotsDep,
        idempotency_key: IdempotencyHeader = None,
    ) -> None:
        self.request, self.principal, self.queue, self.settings = request, principal, queue, settings
        self.metrics, self.wait_slots, self.idempotency_key = metrics, wait_slots, idempotency_key

    @property
    def capabilities(self):
        return self.request.app.state.capabilities

    async def submit(self, body: GenerationOptions, api: str) -> tuple[JobRecord, bool]:
        """:func:`submit_job` with this call's caller, queue, settings, metrics and key."""
        return await submit_job(
            body, api=api, principal=self.principal, queue=self.queue, settings=self.settings, metrics=self.metrics,
            idempotency_key=self.idempotency_key, capabilities=self.capabilities,
        )

    async def wait(self, record: JobRecord, timeout_s: float) -> JobRecord | None:
        """:func:`wait_or_cancel`: a caller that disconnects cancels its job unless it sent a key."""
        return await wait_or_cancel(
            self.queue, record, timeout_s, self.request, cancel_on_disconnect=self.idempotency_key is None
        )


SubmissionDep = Annotated[Submission, Depends()]


def failed_job_response(record: JobRecord) -> JSONResponse:
    """The answer to a synchronous request whose job failed, from its structured failure:
    422 naming the field for ``invalid_input`` (raised), else the kind's status with
    ``{detail, kind}``."""
    failure = record.failure or Failure.of(FailureKind.INTERNAL)
    if failure.kind == FailureKind.INVALID_INPUT:
        loc: list[str | int] = ["body", *field_loc(failure.field or "")]
        raise RequestValidationError([{"loc": loc, "msg": failure.message, "type": "invalid_input"}])
    body = ErrorMessage(detail=f"job {record.id} failed: {failure.message}", kind=failure.kind)
    retry_after = _RETRY_AFTER_S.get(failure.kind)
    return JSONResponse(
        body.model_dump(mode="json"),
        status_code=_STATUS_BY_FAILURE[failure.kind],
        headers={"Retry-After": str(retry_after)} if retry_after else None,
    )


async def wait_or_cancel(
    queue: JobQueue, record: JobRecord, timeout_s: float, request: Request, cancel_on_disconnect: bool
) -> JobRecord | None:
    try:
        return await wait_for_terminal(queue, record.id, timeout_s, request)
    except ClientDisconnected:
        if cancel_on_disconnect:
            await queue.cancel(record.id)
        raise HTTPException(499, detail="client closed the request") from None
    except QueueUnavailable:
        raise accepted_job_unavailable(record.id) from None


def unsuccessful_answer(
    final: JobRecord | None,
    record: JobRecord,
    settings: Settings,
    *,
    unfinished_headers: dict[str, str],
    finished_headers: dict[str, str],
) -> JSONResponse | None:
    """A synchronous endpoint's answer unless its job succeeded (then None): raises 504 with the
    job's Location while it is unfinished, 409 if canceled; returns a failed job's response."""
    if final is None or final.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED):
        raise HTTPException(
            status.HTTP_504_GATEWAY_TIMEOUT,
            detail=f"job {record.id} did not finish within {settings.sync_timeout_s:g} s; poll /jobs/{record.id}",
            headers={"Location": f"/jobs/{record.id}", **unfinished_headers},
        )
    if final.status == JobStatus.FAILED:
        failed = failed_job_response(final)
        failed.headers.update(finished_headers)
        return failed
    if final.status == JobStatus.CANCELED:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {final.id} was canceled", headers=finished_headers)
    return None


def accepted(record: JobRecord, *, replayed: bool, preference_applied: bool) -> JSONResponse:
    body = JobAccepted(id=record.id, status=record.status.value, links=job_links(record.id))
    headers = {"Location": f"/jobs/{record.id}"}
    if preference_applied:
        headers["Preference-Applied"] = "respond-async"
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body.model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED, headers=headers)


async def load_images(queue: JobQueue, record: JobRecord) -> list[bytes]:
    images = []
    for k in range(record.n_images):
        try:
            data = await queue.get_image(record.id, k)
        except QueueUnavailable:
            raise accepted_job_unavailable(record.id) from None
        if data is None:
            raise HTTPException(status.HTTP_410_GONE, detail=f"result image {k} of job {record.id} expired")
        images.append(data)
    return images


#: Tells OpenAI's clients not to resend (they retry 409 and 5xx): the job exists, a retry is another one.
NO_RETRY = {"x-should-retry": "false"}
NO_RETRY_HEADER = {
    "x-should-retry": {"description": "false: the job exists; resending creates another", "schema": {"type": "string"}}
}


def not_to_retry(exc: HTTPException) -> HTTPException:
    """``exc``, marked with :data:`NO_RETRY`."""
    exc.headers = {**(exc.headers or {}), **NO_RETRY}
    return exc


# --------------------------------------------------------------------- routes


@router.post(
    "/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,
    responses={
        202: {"model": JobAccepted, "description": "Accepted (Prefer: respond-async, or the sync wait timed out)"},
        **COMMON_ERRORS,
    },
)
async def generate(body: GenerateRequest, call: SubmissionDep, prefer: PreferHeader = None) -> JSONResponse:
    """Generate images. Waits for them by default; ``Prefer: respond-async`` answers 202 at once."""
    respond_async, wait_s = parse_prefer(prefer)
    queue, settings = call.queue, call.settings
    if respond_async:
        record, replayed = await call.submit(body, "generate")
        return accepted(record, replayed=replayed, preference_applied=True)
    timeout_s = settings.sync_timeout_s if wait_s is None else min(wait_s, settings.sync_timeout_s)
    with call.wait_slots.hold(call.principal):
        record, replayed = await call.submit(body, "generate")
        final = await call.wait(record, timeout_s)
    if final is None or final.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED):
        return accepted(final or record, replayed=replayed, preference_applied=False)
    if final.status == JobStatus.FAILED:
        return failed_job_response(final)
    seeds = image_seeds(final)
    images: list[ImageOut] = []
    if final.status == JobStatus.SUCCEEDED:
        if body.response_format == "b64_json":
            blobs = await load_images(queue, final)
            images = [
                ImageOut(b64_json=base64.b64encode(blob).decode("ascii"), seed=seeds[k] if k < len(seeds) else 0)
                for k, blob in enumerate(blobs)
            ]
        else:
            images = [
                ImageOut(url=image_path(final.id, k), seed=seeds[k] if k < len(seeds) else 0)
                for k in range(final.n_images)
            ]
    response = GenerateResponse(id=final.id, status=final.status.value, images=images, timings=job_timings(final))
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return JSONResponse(response.model_dump(mode="json", exclude_none=True), headers=headers)


#: OpenAI's own image models: code written for OpenAI names one, meaning "the image model"; it gets the
#: served one, so it runs unchanged against this server (any other id that is not the served one is a 404).
OPENAI_IMAGE_MODEL_PREFIXES = ("dall-e-", "gpt-image-")


def serves_model(requested: str | None, served: str) -> bool:
    return requested is None or requested == served or requested.startswith(OPENAI_IMAGE_MODEL_PREFIXES)


_OPENAI_IMAGES_RESPONSES = in_openai_shape(
    {
        **AUTH_ERRORS,
        404: {"description": "model is not the served model's id (code model_not_found)"},
        409: {"description": "The job was canceled", "headers": NO_RETRY_HEADER},
        504: {
            "description": "The job did not finish within sync_timeout_s (it keeps running: poll its Location)",
            "headers": NO_RETRY_HEADER,
        },
        **COMMON_ERRORS,
        422: {"description": "Invalid input; param names the field"},
    }
)


@router.post(
    "/v1/images/generations",
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    responses=_OPENAI_IMAGES_RESPONSES,
    tags=["openai"],
)
async def openai_images(body: OpenAIImagesRequest, call: SubmissionDep) -> JSONResponse:
    """OpenAI-compatible image generation (prompt, n, size, response_format; /generate fields as extensions)."""
    check_served_model(body.model, call.capabilities.id)
    return await _openai_images_answer(body, call)


def check_served_model(requested: str | None, served: str) -> None:
    """A 404 ``model_not_found``, as OpenAI answers a model it does not have, unless ``requested``
    is served (:func:`serves_model`)."""
    if not serves_model(requested, served):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail={
                "message": f"The model {requested!r} does not exist here: this server serves {served!r} "
                "(GET /v1/models); send that id or omit model",
                "param": "model",
                "code": "model_not_found",
            },
        )


async def _openai_images_answer(body: OpenAIImagesRequest, call: Submission) -> JSONResponse:
    """Submit an OpenAI images request (generations, edits), wait for it, answer ``{created, data}``."""
    queue, settings = call.queue, call.settings
    # size -> width/height, so every later check (and the job) sees one size.
    body = apply_size(body, settings, call.capabilities)
    with call.wait_slots.hold(call.principal):
        record, replayed = await call.submit(body, "openai")
        # Still running, or out of sight through an outage: a resend under the same Idempotency-Key is
        # this job again and waits on, so a client that sent one may retry; without one it would be another job.
        unfinished = {} if call.idempotency_key is not None else NO_RETRY
        try:
            final = await call.wait(record, settings.sync_timeout_s)
        except HTTPException as exc:
            exc.headers = {**(exc.headers or {}), **unfinished}
            raise exc from None
    unsuccessful = unsuccessful_answer(final, record, settings, unfinished_headers=unfinished, finished_headers=NO_RETRY)
    if unsuccessful is not None:
        return unsuccessful
    assert final is not None
    if body.response_format == "b64_json":
        try:
            blobs = await load_images(queue, final)
        except HTTPException as exc:
            raise not_to_retry(exc) from None
        data = [OpenAIImage(b64_json=base64.b64encode(blob).decode("ascii")) for blob in blobs]
    else:
        # Never from the request (its Host header is the client's to choose): configured, else relative.
        base = (settings.public_base_url or "").rstrip("/")
        data = [OpenAIImage(url=base + image_path(final.id, k)) for k in range(final.n_images)]
    created = int(final.finished_at or time.time())
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return JSONResponse(
        OpenAIImagesResponse(created=created, data=data).model_dump(mode="json", exclude_none=True), headers=headers
    )


# ------------------------------------------------------------ OpenAI image edits

#: The file fields of ``/v1/images/edits`` (OpenAI's; ``image[]``, its array form, is taken for one image).
EDIT_FILES = ("image", "mask")
#: The multipart reader's limits: two files, a few dozen short text fields (each text part at most 64 KiB).
_EDIT_FORM_LIMITS = {"max_files": len(EDIT_FILES), "max_fields": 32, "max_part_size": 64 * 1024}
#: This API's names of the edit's images -> OpenAI's, for error locations.
_EDIT_FIELD_NAMES = {"init_image": "image"}


def _edit_form_schema() -> dict[str, Any]:
    schema = OpenAIImageEditForm.model_json_schema()
    schema["properties"] = {
        "image": {"type": "string", "format": "binary", "description": "PNG or JPEG to edit (its size: the output's)."},
        "mask": {
            "type": "string", "format": "binary",
            "description": "PNG of the image's size: its fully transparent pixels (alpha 0) are repainted, as "
            "OpenAI's; a mask without alpha: its white pixels. Absent: the image's own transparent pixels.",
        },
        **schema["properties"],
    }
    schema["required"] = ["image", *schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


async def read_edit_form(request: Request, settings: Settings) -> tuple[dict[str, str], dict[str, bytes]]:
    """The text fields and the files of a multipart edit request, each file read up to the image limit."""
    refusal = form_data_refusal(request.headers.get("content-type"), request.headers.get("content-encoding"))
    if refusal is not None:
        raise refusal
    try:
        form = await request.form(**_EDIT_FORM_LIMITS)
    except (StarletteHTTPException, MultiPartException) as exc:  # a malformed body, or one past the limits
        reason = getattr(exc, "detail", None) or getattr(exc, "message", "")
        raise_invalid([field_error(("body",), f"not a readable multipart/form-data body: {reason}", "form_invalid")])
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    errors = []
    try:
        for name, value in form.multi_items():
            key = name.removesuffix("[]")
            if isinstance(value, UploadFile):
                if key not in EDIT_FILES:
                    errors.append(field_error(("body", key), "not a file field of this endpoint (image, mask)", "extra_forbidden"))
                elif key in files:
                    errors.append(field_error(("body", key), f"send one {key} (one image is edited)", "unsupported"))
                else:
                    data = await value.read(settings.max_image_bytes + 1)
                    if len(data) > settings.max_image_bytes:
                        raise PayloadTooLarge([field_error(
                            ("body", key), f"image is larger than the limit of {settings.max_image_bytes} bytes",
                            "too_large", ctx={"max_bytes": settings.max_image_bytes},
                        )])
                    files[key] = data
            elif key in EDIT_FILES:
                errors.append(field_error(("body", key), "must be a file (a multipart part with a filename)", "file_expected"))
            elif key in fields:
                errors.append(field_error(("body", key), "sent twice", "duplicate_field"))
            else:
                fields[key] = value
    finally:
        await form.close()
    if "image" not in files and not any(error["loc"] == ["body", "image"] for error in errors):
        errors.append(field_error(("body", "image"), "the image to edit is required (a PNG or JPEG file)", "missing"))
    raise_invalid(errors)
    return fields, files


def _alpha(image: Image.Image) -> np.ndarray | None:
    """The image's alpha channel, or None where it has none."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"))[..., 3]
    return None


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def edit_mask(image: bytes, mask: bytes | None, settings: Settings) -> bytes:
    """OpenAI's edit mask as this API's ``mask`` (white repaints): the mask's fully transparent pixels
    where it has an alpha channel, else its own white; without a mask, the image's transparent pixels
    (OpenAI: "If mask is not provided, image must have transparency")."""
    if mask is not None:
        with open_image(mask, ("body", "mask"), settings.max_image_pixels, ("PNG", "JPEG")) as opened:
            alpha = _alpha(opened)
        return mask if alpha is None else _png(np.where(alpha == 0, 255, 0).astype(np.uint8))
    with open_image(image, ("body", "image"), settings.max_image_pixels, ("PNG", "JPEG")) as opened:
        alpha = _alpha(opened)
    if alpha is None or not (alpha == 0).any():
        raise_invalid([field_error(
            ("body", "mask"), "send a mask, or an image with fully transparent pixels (alpha 0) where to edit",
            "mask_missing",
        )])
    return _png(np.where(alpha == 0, 255, 0).astype(np.uint8))


def edit_request(fields: dict[str, str], files: dict[str, bytes], settings: Settings) -> OpenAIImagesRequest:
    """The edit as an OpenAI images request with this API's ``init_image`` and ``mask`` (image decoding:
    call it from a thread pool)."""
    form = _in_body(OpenAIImageEditForm, fields)
    mask = edit_mask(files["image"], files.get("mask"), settings)
    data = {
        **form.model_dump(exclude_none=True, exclude=set(OpenAIImageEditForm.IGNORED)),
        "init_image": base64.b64encode(files["image"]).decode("ascii"),
        "mask": base64.b64encode(mask).decode("ascii"),
    }
    return _in_body(OpenAIImagesRequest, data)  # (the route names the fields as OpenAI's)


def _in_body(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """``model`` validated from ``data``; its errors as FastAPI's for a body (``loc`` under "body")."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]) from None


def _with_edit_names(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Errors whose locations name the edit's fields as OpenAI's (``image``, not ``init_image``)."""
    renamed = []
    for error in errors:
        loc = list(error.get("loc", ()))
        if len(loc) >= 2 and loc[0] == "body" and loc[1] in _EDIT_FIELD_NAMES:
            loc[1] = _EDIT_FIELD_NAMES[loc[1]]
        renamed.append({**error, "loc": loc})
    return renamed


@router.post(
    "/v1/images/edits",
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    responses={**_OPENAI_IMAGES_RESPONSES, 415: {"model": OpenAIError, "description": "The body is not multipart/form-data"}},
    openapi_extra=_edit_form_schema(),
    tags=["openai"],
)
async def openai_image_edits(call: SubmissionDep) -> JSONResponse:
    """OpenAI-compatible image edit (inpainting): ``image`` and ``mask`` files, ``prompt``, ``n``, ``size``,
    ``response_format``; /generate's fields as extensions. Imported latent models (SD, SDXL) only, as img2img."""
    settings = call.settings
    fields, files = await read_edit_form(call.request, settings)
    check_served_model(fields.get("model"), call.capabilities.id)
    try:
        body = await run_in_threadpool(edit_request, fields, files, settings)
        return await _openai_images_answer(body, call)
    except RequestValidationError as exc:
        raise RequestValidationError(_with_edit_names(list(exc.errors()))) from None
    except PayloadTooLarge as exc:
        raise PayloadTooLarge(_with_edit_names(exc.errors())) from None

"""Property-based API test: schemathesis generates requests from the OpenAPI schema and
checks every response against it, on the real ``ediffi serve`` (API + worker in one
process, the in-process queue, the tiny model), running as a child process.

Checks: no 5xx (``not_a_server_error``: bad input must never be a 500, and a valid job
must not fail on the worker) and responses match the documented status codes, content
types, headers and schemas. Bounded: 25 examples per operation, no deadline, small
server limits (n <= 2, prompts <= 200 chars) so the valid requests that reach the worker are cheap.

The schema is built at collection time from ``create_app`` with the server's settings
(schemathesis' lazy ``from_fixture`` loader does not work with pytest 9), and a test pins
it to the ``/openapi.json`` the running server serves.
"""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from PIL import Image

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.support.process import serve_process  # noqa: E402

pytestmark = [pytest.mark.timeout(240)]

MAX_EXAMPLES = 25
CANVAS = 32  # the tiny model's output size
SERVER_SETTINGS = {
    "intra_op_threads": 1,
    "max_steps": 32,  # not below the default steps (32), or a request without "steps" is invalid
    "max_n": 2,
    "max_prompt_chars": 200,
    "max_regions": 4,
    "sync_timeout_s": 20,
    "max_queue": 64,
    "rate_limit_per_minute": 100000,
    "allow_anonymous": True,  # loopback, no keys
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _openapi() -> dict:
    app_settings = Settings(redis_url=None, api_keys=[], **SERVER_SETTINGS)
    return create_app(app_settings, canvas_size=CANVAS, static_dir=None).openapi()


schema = schemathesis.openapi.from_dict(_openapi())


@pytest.fixture(scope="module")
def serve_url(tiny_model_dir, tmp_path_factory):
    """``python -m ediffi serve`` on a free port, without Redis (the in-process queue)."""
    with serve_process(tiny_model_dir, SERVER_SETTINGS, tmp_path_factory.mktemp("serve-logs")) as url:
        yield url  # on exit: the fuzzing did not bring it down


def test_the_server_serves_the_schema_under_test(serve_url):
    served = httpx.get(serve_url + "/openapi.json", timeout=10).json()
    assert served == _openapi()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
    derandomize=True,
)
def test_api_conforms_to_its_openapi_schema(case, serve_url):
    case.call_and_validate(base_url=serve_url, checks=CHECKS, timeout=30)


def test_a_real_job_lifecycle_conforms_to_the_schema(serve_url):
    """The responses fuzzing rarely reaches (a real job's view, images, events, cancel),
    driven by hand and validated with the same checks."""

    def call(path: str, method: str, **kwargs):
        case = schema[path][method].Case(**kwargs)
        return case.call_and_validate(base_url=serve_url, checks=CHECKS, timeout=60)

    def size(png: bytes) -> tuple[int, int]:
        assert png.startswith(b"\x89PNG")
        return Image.open(io.BytesIO(png)).size

    body = {"prompt": "a red circle on the left", "steps": 2, "n": 2, "seed": 3}
    done = call("/generate", "POST", body=body)
    assert done.status_code == 200 and len(done.json()["images"]) == 2
    assert [size(base64.b64decode(i["b64_json"])) for i in done.json()["images"]] == [(CANVAS, CANVAS)] * 2
    accepted = call("/generate", "POST", body={**body, "response_format": "url"},
                    headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202
    job_id = accepted.json()["id"]
    deadline = time.monotonic() + 60
    while (view := call("/jobs/{job_id}", "GET", path_parameters={"job_id": job_id})).json()["status"] != "succeeded":
        assert time.monotonic() < deadline, view.json()
        time.sleep(0.1)
    image = call("/jobs/{job_id}/images/{index}.png", "GET", path_parameters={"job_id": job_id, "index": 1})
    assert image.status_code == 200 and size(image.content) == (CANVAS, CANVAS)
    events = call("/jobs/{job_id}/events", "GET", path_parameters={"job_id": job_id})
    assert events.status_code == 200 and "event: succeeded" in events.text
    assert call("/jobs/{job_id}/cancel", "POST", path_parameters={"job_id": job_id}).status_code == 200
    openai = call("/v1/images/generations", "POST", body={"prompt": "a blue square", "size": f"{CANVAS}x{CANVAS}",
                                                          "steps": 2, "response_format": "b64_json"})
    assert openai.status_code == 200 and len(openai.json()["data"]) == 1
    assert size(base64.b64decode(openai.json()["data"][0]["b64_json"])) == (CANVAS, CANVAS)  # the size asked for

"""The torch-free request spec (ediffi.spec): the one home of the request rules."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ediffi import spec
from ediffi.failure import InputError


def test_spec_imports_without_torch():
    code = "import sys, ediffi.spec, server.schemas, server.validation; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "prompt, phrase, span",
    [
        ("a red circle on the left", "Red Circle", (2, 12)),
        ("a red circle on the left", "  circle ", (6, 12)),
        ("a lemon on the left", "on", (8, 10)),  # whole words: not the "on" inside "lemon"
        ("a red circle", "red circles", None),
        ("a red circle", "   ", None),
        ("a (red) circle", "(red)", (2, 7)),  # the phrase is literal text, not a pattern
    ],
)
def test_find_phrase_whole_words_any_case(prompt, phrase, span):
    assert spec.find_phrase(prompt, phrase) == span


def test_phrase_span_names_the_field():
    with pytest.raises(InputError) as err:
        spec.phrase_span("a red circle", "blue square", spec.region_field(1, "phrase"))
    assert err.value.field == "paint_with_words.regions[1].phrase"
    assert "'blue square' does not occur" in err.value.message


def test_color_map_aspect():
    spec.check_color_map_aspect(64, 64, 16, 16)
    spec.check_color_map_aspect(101, 100, 16, 16)  # within the 2 % tolerance
    with pytest.raises(InputError) as err:
        spec.check_color_map_aspect(64, 32, 16, 16)
    assert err.value.field == spec.COLOR_MAP_FIELD
    assert err.value.message == "colour map is 64x32 (aspect 2.000); it must be square like the canvas"
    spec.check_color_map_aspect(128, 64, 32, 16)
    with pytest.raises(InputError, match="but the canvas aspect is 2.000"):
        spec.check_color_map_aspect(64, 64, 32, 16)


def test_every_layer_offers_the_spec_samplers():
    from cli.main import build_parser
    from ediffi.config import GenerationDefaults
    from ediffi.samplers import SAMPLERS as implemented
    from server.schemas import GenerateRequest

    assert implemented == spec.SAMPLERS == ("heun", "euler", "dpmpp_2m", "euler_a", "unipc", "ddim", "pndm", "ddpm")
    api_schema = GenerateRequest.model_json_schema()["properties"]["sampler"]
    (named,) = [choice for choice in api_schema["anyOf"] if "enum" in choice]  # null: the default
    assert tuple(named["enum"]) == spec.SAMPLERS
    assert api_schema["default"] is None  # absent: the served model's default (GET /v1/models)
    assert GenerationDefaults().sampler == spec.DEFAULT_SAMPLER  # the shipped family's
    args = build_parser().parse_args(["generate", "x", "--sampler", "dpmpp_2m"])
    assert args.sampler == "dpmpp_2m"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "x", "--sampler", "lms"])

"""The request rules, in one torch-free module: every layer that reads a
request (the HTTP schemas and validation, the command line, the pipeline and
the engine) takes its fields' defaults and limits, the sampler names and the
paint-with-words rules from here, so they cannot drift apart.

Imports nothing heavier than the standard library and :mod:`ediffi.failure`
(the API process imports it and must not load torch; a test checks). A rule
broken by a request raises :class:`~ediffi.failure.InputError` ``(field,
message)``, ``field`` a dotted path such as ``paint_with_words.regions[0].phrase``.

Limits that an operator may change (prompt length, ``n``, ``steps``, regions)
are settings; their defaults are here.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Literal, get_args

from ediffi.failure import InputError

# --------------------------------------------------------------------- fields

#: Samplers (``ediffi.samplers`` implements them). heun, euler, dpmpp_2m, euler_a (Euler
#: ancestral, A1111's "Euler a": stochastic, its noise drawn from the image's seed) and unipc
#: (diffusers' UniPCMultistepScheduler: bh2, order 2) solve on the
#: Karras sigma schedule, or on an imported checkpoint's own spaced sigmas; ddim, pndm and ddpm
#: reproduce diffusers' DDIMScheduler (eta 0), PNDMScheduler (PLMS, skip_prk_steps) and DDPMScheduler
#: (ancestral, with IF's learned variance) on an imported checkpoint's own timesteps, and only there.
SamplerName = Literal["heun", "euler", "dpmpp_2m", "euler_a", "unipc", "ddim", "pndm", "ddpm"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
DEFAULT_SAMPLER: SamplerName = "heun"
#: The samplers that take ``use_karras_sigmas: false`` on an imported checkpoint: the diffusers
#: schedulers reproduced on their own spaced sigmas (EulerDiscreteScheduler, DPMSolverMultistepScheduler,
#: EulerAncestralDiscreteScheduler, UniPCMultistepScheduler).
SCHEDULER_SIGMA_SAMPLERS: tuple[str, ...] = ("euler", "dpmpp_2m", "euler_a", "unipc")
#: The samplers that exist only as a diffusers scheduler's own timesteps: imported checkpoints only,
#: never with Karras's sigmas (``use_karras_sigmas`` left out means false for them).
SCHEDULER_ONLY_SAMPLERS: tuple[str, ...] = ("ddim", "pndm", "ddpm")
#: The samplers every model serves (the shipped family's).
ANY_MODEL_SAMPLERS: tuple[str, ...] = tuple(s for s in SAMPLERS if s not in SCHEDULER_ONLY_SAMPLERS)
#: The mix benchmarks and simulations draw by default: one sampler per evaluation pattern (euler_a
#: evaluates where euler does), so the recorded figures keep their meaning.
BENCH_SAMPLERS: tuple[str, ...] = ("heun", "euler", "dpmpp_2m")

DEFAULT_STEPS = 32
DEFAULT_GUIDANCE = 3.0  # classifier-free guidance scale (<= GUIDANCE_OFF_AT_OR_BELOW: off)
MAX_GUIDANCE = 50.0
#: Classifier-free guidance is applied only above this scale. At or below it the
#: conditional prediction is used alone and no unconditional rows are evaluated,
#: as diffusers' pipelines do (``do_classifier_free_guidance = guidance_scale > 1``):
#: clients of SDXL-Turbo-style checkpoints send 0 meaning "off", and
#: ``uncond + 0 (cond - uncond)`` would be an image that ignores the prompt.
GUIDANCE_OFF_AT_OR_BELOW = 1.0
DEFAULT_SEED = 0  # the command line's; the API picks one when the client sends none
MAX_SEED = 2**32 - 1  # image k uses seed + k, so seed + n - 1 must not exceed it (check_seed)
#: A1111's seed for "pick one at random" (its web UI and API send it by default): the API and the
#: command line pick a seed below 2**31, as for an absent one, and report it with the images.
RANDOM_SEED = -1
#: Server-picked seeds stay below 2**31 (safe in every client language and in seed + k).
AUTO_SEED_LIMIT = 2**31


def pick_seed(requested: int | None) -> int:
    """The seed a request runs with: its own, or a random one for none or :data:`RANDOM_SEED`."""
    if requested is None or requested == RANDOM_SEED:
        return secrets.randbelow(AUTO_SEED_LIMIT)
    return requested


#: img2img (an ``init_image``): how much of the schedule runs, diffusers' ``strength`` (its default;
#: A1111's ``denoising_strength`` defaults to 0.75): int(steps x strength) of ``steps`` run, from the
#: noise level of the first of them, on the init image noised to it.
DEFAULT_INIT_STRENGTH = 0.8
#: Inpainting (an ``init_image`` and a ``mask``): diffusers' StableDiffusionInpaintPipeline's default
#: strength, the masked region drawn from pure noise (OpenAI's edits repaint it whole too); a model's
#: own may differ (GenerationDefaults.inpaint_strength: SDXL's inpaint pipeline takes 0.9999).
DEFAULT_INPAINT_STRENGTH = 1.0


def init_image_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` an init image runs: ``min(int(steps x strength), steps)``, as diffusers'
    img2img ``get_timesteps``; at least one, else an :class:`InputError` on ``strength``."""
    if not 0.0 < strength <= 1.0:
        raise InputError("strength", f"must be within (0, 1], got {strength}")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise InputError("strength", f"strength x steps must give at least one step: {strength} x {steps} gives none")
    return run


# Defaults of the operator's limits (server.settings.Settings: max_prompt_chars, max_n, max_steps, max_regions).
DEFAULT_MAX_PROMPT_CHARS = 500
DEFAULT_MAX_N = 8
DEFAULT_MAX_STEPS = 100
DEFAULT_MAX_REGIONS = 8


def guidance_enabled(guidance_scale: float) -> bool:
    """Whether a request is guided (conditional and unconditional rows); see
    :data:`GUIDANCE_OFF_AT_OR_BELOW`. Every layer that plans or runs the rows asks this."""
    return guidance_scale > GUIDANCE_OFF_AT_OR_BELOW


def check_seed(seed: int, n: int) -> None:
    """Image k of ``n`` uses ``seed + k``, so all of them, not only the first, must be
    seeds in ``[0, MAX_SEED]``; raises :class:`InputError` on ``seed``."""
    if seed < 0:
        raise InputError("seed", f"must be >= 0 (or {RANDOM_SEED}: a random one), got {seed}")
    if seed + max(n, 1) - 1 > MAX_SEED:
        raise InputError(
            "seed",
            f"image k uses seed + k, so with n={n} the seed must be <= {MAX_SEED - max(n, 1) + 1} "
            f"(the last image's seed at most {MAX_SEED}), got {seed}",
        )


# ------------------------------------------------------------------ style image

#: A style image's longer side may be at most this many times its shorter. CLIP's image processor
#: scales the shorter side up to its input size before cropping, so a 1048576x1 strip (within any
#: pixel limit) would become an image of gigabytes on the worker's device thread.
MAX_STYLE_IMAGE_ASPECT = 8.0


def check_style_image_shape(width: int, height: int) -> None:
    """Raise :class:`InputError` on ``style_image`` for a strip longer than :data:`MAX_STYLE_IMAGE_ASPECT`."""
    if max(width, height) > MAX_STYLE_IMAGE_ASPECT * min(width, height):
        raise InputError(
            "style_image",
            f"style image is {width}x{height}; its longer side may be at most {MAX_STYLE_IMAGE_ASPECT:g} times "
            "its shorter (crop it: only its centre square is seen)",
        )


def check_mask_size(mask_size: tuple[int, int], init_image_size: tuple[int, int]) -> None:
    """Raise :class:`InputError` on ``mask`` unless it is the init image's size (both are then resized
    to the output size together: a mask of another shape would be stretched over other pixels)."""
    if tuple(mask_size) != tuple(init_image_size):
        raise InputError(
            "mask", f"is {mask_size[0]}x{mask_size[1]}; it must be the init image's size, "
            f"{init_image_size[0]}x{init_image_size[1]}",
        )


def check_mask_to_crop(mask) -> None:
    """Raise :class:`InputError` on ``mask`` (a PIL image) where ``padding_mask_crop`` has nothing to crop
    around: no pixel of it is above black (diffusers' get_crop_region finds no region there)."""
    if mask.convert("L").getbbox() is None:
        raise InputError("mask", "has no pixel to repaint: nothing to crop around (padding_mask_crop)")


# ------------------------------------------------------------ paint-with-words

#: Paint-with-words strength w' of a region (eDiff-I §4.3) when none is given, and its largest value.
DEFAULT_STRENGTH = 0.4
MAX_STRENGTH = 10.0
#: A region's colour in the colour map: exactly "#rrggbb".
HEX_COLOR_PATTERN = r"^#[0-9a-fA-F]{6}$"
_HEX_COLOR = re.compile(HEX_COLOR_PATTERN)
#: A colour map must match the canvas aspect within this relative tolerance.
ASPECT_TOLERANCE = 0.02

COLOR_MAP_FIELD = "paint_with_words.color_map"
REGIONS_FIELD = "paint_with_words.regions"


def region_field(index: int, name: str) -> str:
    """Dotted path of one region's field, e.g. ``paint_with_words.regions[0].phrase``."""
    return f"{REGIONS_FIELD}[{index}].{name}"


class PaintWithWordsError(InputError):
    """Invalid paint-with-words input; ``field`` names the offending field."""


@dataclass(frozen=True)
class Region:
    """One painted region: pixels of ``color`` in the colour map are where ``phrase`` goes."""

    color: str  # "#rrggbb"
    phrase: str
    strength: float = DEFAULT_STRENGTH

    @property
    def rgb(self) -> tuple[int, int, int]:
        return parse_color(self.color)


def parse_color(color: str) -> tuple[int, int, int]:
    if not _HEX_COLOR.match(color):
        raise ValueError(f"colour {color!r} is not of the form #rrggbb")
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def parse_region_arg(arg: str) -> Region:
    """Command-line form '#rrggbb=phrase[:strength]'."""
    if "=" not in arg:
        raise ValueError(f"region {arg!r} must look like '#rrggbb=phrase[:strength]'")
    color, rest = arg.split("=", 1)
    phrase, strength = rest, DEFAULT_STRENGTH
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        try:
            phrase, strength = head, float(tail)
        except ValueError:
            phrase = rest
    parse_color(color)
    return Region(color=color.lower(), phrase=phrase.strip(), strength=strength)


def find_phrase(prompt: str, phrase: str) -> tuple[int, int] | None:
    """Character span of the first whole-word, case-insensitive occurrence of
    ``phrase`` (stripped) in ``prompt``; None when it does not occur or is blank."""
    words = phrase.strip()
    if not words or len(words) > len(prompt):  # the length test spares a regex scan of a hostile phrase
        return None
    match = re.search(r"(?<!\w)" + re.escape(words) + r"(?!\w)", prompt, flags=re.IGNORECASE)
    return match.span() if match else None


def phrase_span(prompt: str, phrase: str, field: str) -> tuple[int, int]:
    """:func:`find_phrase`, raising :class:`PaintWithWordsError` on ``field`` when there is no occurrence."""
    if not phrase.strip():
        raise PaintWithWordsError(field, "phrase is empty")
    span = find_phrase(prompt, phrase)
    if span is None:
        raise PaintWithWordsError(field, f"phrase {phrase!r} does not occur in the prompt {prompt!r}")
    return span


def check_color_map_aspect(map_width: int, map_height: int, canvas_width: int, canvas_height: int) -> None:
    """The colour map is area-resized to the canvas, so it must have the canvas's aspect
    (within :data:`ASPECT_TOLERANCE`); raises :class:`PaintWithWordsError` on the colour map."""
    map_aspect = map_width / map_height
    want = canvas_width / canvas_height
    if abs(map_aspect - want) / want <= ASPECT_TOLERANCE:
        return
    size = f"colour map is {map_width}x{map_height} (aspect {map_aspect:.3f})"
    if canvas_width == canvas_height:
        raise PaintWithWordsError(COLOR_MAP_FIELD, f"{size}; it must be square like the canvas")
    raise PaintWithWordsError(COLOR_MAP_FIELD, f"{size} but the canvas aspect is {want:.3f}")

"""Imported diffusers checkpoints (issue 17): the discrete-time UNet as an EDM
denoiser, the importer's errors, and parity of whole images with diffusers'
own pipelines on tiny random checkpoints (tests/support/diffusers.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from ediffi.config import ModelConfig
from tests.support.diffusers import karras_euler, psnr, sdxl_reference

diffusers = pytest.importorskip("diffusers")

PARITY_DB = 35.0


def _reference_denoised(unet, scheduler, x, sigma, **unet_kwargs):
    """D(x; sigma) as diffusers computes it: the scheduler's timestep for
    sigma, its input scaling, the UNet, and its step's x0 prediction."""
    scheduler.set_timesteps(sigmas=[sigma, 0.0])
    t = scheduler.timesteps[0]
    model_input = scheduler.scale_model_input(x, t)
    out = unet(model_input, t, **unet_kwargs).sample
    return scheduler.step(out, t, x).pred_original_sample


@pytest.mark.parametrize("folder", ["sd", "sd-v"])
def test_denoiser_call_equals_unet_plus_scheduler_scaling(tiny_diffusers_dir, tmp_path, folder):
    """A call at each of four sigmas equals diffusers' UNet +
    EulerDiscreteScheduler scaling (timestep, scale_model_input, the step's
    x0 prediction) to 1e-4 relative; one call with the four sigmas as four
    rows (per-row sigma) gives the same rows up to batched float32 rounding."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from ediffi.importers.diffusers import import_diffusers
    from ediffi.model import load_model

    import_diffusers(tiny_diffusers_dir / folder, tmp_path / "m")
    expert = load_model(tmp_path / "m").stages["base"].experts["unet"]
    unet = UNet2DConditionModel.from_pretrained(tiny_diffusers_dir / folder / "unet", use_safetensors=True).eval()
    scheduler = EulerDiscreteScheduler.from_config(
        json.loads((tiny_diffusers_dir / folder / "scheduler" / "scheduler_config.json").read_text())
    )
    sigmas = [0.03, 0.4, 2.5, 14.0]
    rows = len(sigmas)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 4, 16, 16, generator=g) * torch.tensor(sigmas).view(-1, 1, 1, 1)
    context = torch.randn(rows, 77, 32, generator=g)

    def call(i, j):
        return expert(x[i:j], torch.tensor(sigmas[i:j]), context[i:j], torch.ones(j - i, 77, dtype=torch.bool),
                      torch.zeros(j - i, 0), torch.zeros(j - i, 77, 16, 16), torch.zeros(j - i))

    with torch.no_grad():
        batched = call(0, rows)
        for i, sigma in enumerate(sigmas):
            ref = _reference_denoised(unet, scheduler, x[i : i + 1], sigma, encoder_hidden_states=context[i : i + 1])
            alone = call(i, i + 1)
            assert (alone - ref).norm() / ref.norm() < 1e-4, (folder, sigma)
            assert (batched[i : i + 1] - alone).norm() / alone.norm() < 1e-3, (folder, sigma)


def test_karras_schedule_is_diffusers_and_within_trained_range(tiny_diffusers_dir):
    from diffusers import EulerDiscreteScheduler

    from ediffi.discrete import inference_sigmas, training_sigmas
    from ediffi.importers.diffusers import PipelineFolder, schedule_of

    for folder in ("sd", "sdxl-base"):
        schedule, _ = schedule_of(PipelineFolder.open(tiny_diffusers_dir / folder))
        cfg = json.loads((tiny_diffusers_dir / folder / "scheduler" / "scheduler_config.json").read_text())
        reference = EulerDiscreteScheduler.from_config(cfg, use_karras_sigmas=True)
        trained = training_sigmas(schedule)
        for steps in (1, 7, 30):
            reference.set_timesteps(steps)
            ours = inference_sigmas(schedule, steps)
            torch.testing.assert_close(ours.float(), reference.sigmas, rtol=1e-6, atol=0)
            assert trained[0] <= ours[-2] and ours[0] <= trained[-1]


def _write_generate(model_dir, out, *extra):
    from cli.main import main

    code = main(["generate", "a red cat on the house", "--model-dir", str(model_dir), "--sampler", "euler",
                 "--karras-sigmas", "--steps", "8", "--guidance", "5", "--seed", "7", "--out", str(out), *extra])
    assert code == 0
    return Image.open(out)


def test_sd_generate_matches_stable_diffusion_pipeline(tiny_diffusers_dir, imported_sd_dir, tmp_path):
    """`ediffi generate` on the imported SD checkpoint = StableDiffusionPipeline
    with Euler + Karras sigmas, same seed, steps, guidance, negative prompt."""
    from diffusers import StableDiffusionPipeline

    ours = _write_generate(imported_sd_dir, tmp_path / "ours.png", "--negative-prompt", "blue sky")
    pipe = karras_euler(StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir / "sd", use_safetensors=True))
    ref = pipe("a red cat on the house", negative_prompt="blue sky", num_inference_steps=8, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(7)).images[0]
    assert ours.size == ref.size == (32, 32)  # diffusers' default: unet.sample_size * vae scale factor
    print(f"SD parity: PSNR {psnr(ours, ref):.2f} dB")
    assert psnr(ours, ref) >= PARITY_DB
    # The bar can fail: another prompt (same seed) is far below it.
    other = pipe("a blue dog", negative_prompt="blue sky", num_inference_steps=8, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(7)).images[0]
    assert psnr(ours, other) < PARITY_DB - 5


def test_v_prediction_checkpoint_matches_stable_diffusion_pipeline(tiny_diffusers_dir, tmp_path):
    """An SD 2.x-style v-prediction checkpoint (prediction_type from its
    scheduler config), imported and generated, = diffusers' pipeline."""
    from diffusers import StableDiffusionPipeline

    from ediffi.importers.diffusers import import_diffusers

    import_diffusers(tiny_diffusers_dir / "sd-v", tmp_path / "m")
    ours = _write_generate(tmp_path / "m", tmp_path / "ours.png")
    pipe = karras_euler(StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir / "sd-v", use_safetensors=True))
    ref = pipe("a red cat on the house", num_inference_steps=8, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(7)).images[0]
    print(f"SD v-prediction parity: PSNR {psnr(ours, ref):.2f} dB")
    assert psnr(ours, ref) >= PARITY_DB


def test_sdxl_base_and_refiner_match_diffusers(tiny_diffusers_dir, imported_sdxl_dir, tmp_path):
    """The imported SDXL base + refiner (two experts split at high_noise_frac
    0.8) = StableDiffusionXLPipeline(denoising_end=0.8, output_type="latent")
    then StableDiffusionXLImg2ImgPipeline(denoising_start=0.8), at a
    non-default, non-square size, with an empty negative prompt (zeros for
    the base, the encoding of "" for the refiner)."""
    ours = _write_generate(imported_sdxl_dir, tmp_path / "ours.png", "--width", "48", "--height", "32")
    ref = sdxl_reference(tiny_diffusers_dir, "a red cat on the house", seed=7, steps=8, guidance=5.0, width=48, height=32)
    assert ours.size == ref.size == (48, 32)
    print(f"SDXL base + refiner parity: PSNR {psnr(ours, ref):.2f} dB")
    assert psnr(ours, ref) >= PARITY_DB


def test_sdxl_defaults_are_the_pipelines_as_loaded(tiny_diffusers_dir, imported_sdxl_dir, tmp_path):
    """With only a prompt, seed and steps, the imported SDXL base + refiner = diffusers' documented
    ensemble-of-experts example with the schedulers the folders name (EulerDiscreteScheduler on its
    own "leading" sigmas, not Karras's), its guidance 5 and high_noise_frac 0.8."""
    from cli.main import main

    assert json.loads((imported_sdxl_dir / "model.json").read_text())["defaults"]["use_karras_sigmas"] is False
    out = tmp_path / "ours.png"
    assert main(["generate", "a red cat on the house", "--model-dir", str(imported_sdxl_dir), "--steps", "8",
                 "--seed", "7", "--width", "48", "--height", "32", "--out", str(out)]) == 0
    ours = Image.open(out)
    ref = sdxl_reference(tiny_diffusers_dir, "a red cat on the house", seed=7, steps=8, guidance=5.0, width=48,
                         height=32, karras=False)
    print(f"SDXL base + refiner, schedulers as loaded: PSNR {psnr(ours, ref):.2f} dB")
    assert psnr(ours, ref) >= PARITY_DB
    karras = sdxl_reference(tiny_diffusers_dir, "a red cat on the house", seed=7, steps=8, guidance=5.0, width=48,
                            height=32)
    assert psnr(ours, karras) < psnr(ours, ref) - 5  # the bar tells the two schedules apart


@pytest.mark.parametrize("folder", ["sd", "sd-v"])
def test_euler_on_the_schedulers_own_sigmas_matches_euler_discrete(tiny_diffusers_dir, tmp_path, folder):
    """--no-karras-sigmas = EulerDiscreteScheduler.from_config(the folder's config): SD's "linspace"
    spacing (fractional timesteps, fed to the UNet exactly), epsilon and v-prediction."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from cli.main import main
    from ediffi.importers.diffusers import import_diffusers

    import_diffusers(tiny_diffusers_dir / folder, tmp_path / "m")
    out = tmp_path / "ours.png"
    assert main(["generate", "a red cat on the house", "--model-dir", str(tmp_path / "m"), "--sampler", "euler",
                 "--no-karras-sigmas", "--steps", "7", "--guidance", "5", "--seed", "7", "--out", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir / folder, use_safetensors=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red cat on the house", num_inference_steps=7, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(7)).images[0]
    print(f"{folder} Euler on the scheduler's own sigmas: PSNR {psnr(Image.open(out), ref):.2f} dB")
    assert psnr(Image.open(out), ref) >= PARITY_DB


def test_sdxl_refiner_runs_the_low_noise_steps(imported_sdxl):
    """The refiner owns exactly the steps diffusers' denoising_start=0.8 gives it."""
    from ediffi.pipeline import stage_sigmas

    stage = imported_sdxl.config.stages[0]
    ensemble = imported_sdxl.stages[stage.name]
    sigmas = stage_sigmas(stage, 8)[:-1]
    owners = [ensemble.route(float(s)) for s in sigmas]
    assert owners == ["base"] * owners.count("base") + ["refiner"] * owners.count("refiner")
    assert owners.count("refiner") >= 1 and owners.count("base") >= 1


# -- import errors ------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_pickled_weights_are_refused_by_name(tiny_diffusers_dir, tmp_path):
    from ediffi.importers.diffusers import DiffusersImportError, import_diffusers

    folder = _copy(tiny_diffusers_dir / "sd", tmp_path / "sd")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(DiffusersImportError, match=r"unet/diffusion_pytorch_model\.bin: pickled weights"):
        import_diffusers(folder, tmp_path / "out")


def test_unknown_pipeline_class_is_named(tiny_diffusers_dir, tmp_path):
    from ediffi.importers.diffusers import DiffusersImportError, import_diffusers

    folder = _copy(tiny_diffusers_dir / "sd", tmp_path / "sd")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DiffusersImportError, match="'KandinskyPipeline' is not supported"):
        import_diffusers(folder, tmp_path / "out")


def test_missing_component_is_named(tiny_diffusers_dir, tmp_path):
    from ediffi.importers.diffusers import DiffusersImportError, import_diffusers

    folder = _copy(tiny_diffusers_dir / "sdxl-base", tmp_path / "base")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(DiffusersImportError, match="component 'text_encoder_2'.*missing"):
        import_diffusers(folder, tmp_path / "out")


def test_refiner_with_another_text_encoder_is_refused(tiny_diffusers_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from cli.main import main

    refiner = _copy(tiny_diffusers_dir / "sdxl-refiner", tmp_path / "refiner")
    weights = refiner / "text_encoder_2" / "model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1.0
    save_file(state, weights)
    code = main(["import", "diffusers", str(tiny_diffusers_dir / "sdxl-base"), "--refiner", str(refiner), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "does not match the base's" in capsys.readouterr().err


def test_imported_model_refuses_a_style_image(imported_sd_dir):
    from ediffi.model import load_model
    from ediffi.pipeline import GenerationRequest, encode_request

    model = load_model(imported_sd_dir)
    with pytest.raises(ValueError, match="^style_image"):
        encode_request(model, GenerationRequest(prompt="a cat", style_image=Image.new("RGB", (8, 8))))
    with pytest.raises(ValueError, match="^width: must be a positive multiple of 8"):
        encode_request(model, GenerationRequest(prompt="a cat", width=36))


def test_imported_model_needs_the_torch_backend(imported_sd_dir):
    from engines.engine import make_backend

    with pytest.raises(ValueError, match="torch backend only"):
        make_backend("onnxruntime", imported_sd_dir)


# -- where the model directory goes -------------------------------------------


def _import(*args: str) -> int:
    from cli.main import main

    return main(["import", "diffusers", *map(str, args)])


@pytest.mark.parametrize("copy", [False, True])
def test_import_reports_each_component_as_it_is_placed(tiny_diffusers_dir, tmp_path, capsys, copy):
    """A --copy of SDXL is gigabytes: a line per component (with its size) on stderr as it goes."""
    assert _import(tiny_diffusers_dir / "sd", "--out", tmp_path / "m", *(["--copy"] if copy else [])) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    components = sorted(p.name for p in (tmp_path / "m" / "base").iterdir())
    assert len(lines) == len(components) and lines[0].startswith(f"[1/{len(components)}] ")
    verb = "copying" if copy else "linking"
    assert all(f"] {verb} base/" in line for line in lines), lines
    if copy:
        assert all(line.endswith(" GB)") for line in lines), lines


def _weights_intact(folder) -> bool:
    unet = folder / "unet"
    return not unet.is_symlink() and (unet / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("copy", [[], ["--copy"]])
def test_an_out_dir_holding_the_sources_is_refused_and_they_are_kept(tiny_diffusers_dir, tmp_path, capsys, copy):
    # The natural layout weights/sdxl/{base,refiner} with --out weights/sdxl: writing base/ and refiner/ there
    # used to delete the very folders being imported (and link them to themselves).
    root = tmp_path / "weights" / "sdxl"
    base = _copy(tiny_diffusers_dir / "sdxl-base", root / "base")
    refiner = _copy(tiny_diffusers_dir / "sdxl-refiner", root / "refiner")
    for out in (root, base, base / "model"):
        for force in ([], ["--force"]):
            assert _import(base, "--refiner", refiner, "--out", out, *copy, *force) == 2
            assert "overlaps the pipeline folder" in capsys.readouterr().err
    assert _weights_intact(base) and _weights_intact(refiner)
    assert not (base / "model").exists()


def test_an_existing_model_dir_is_replaced_only_with_force_and_nothing_stale_is_left(tiny_diffusers_dir, tmp_path, capsys):
    out = tmp_path / "sdxl"
    base, refiner = tiny_diffusers_dir / "sdxl-base", tiny_diffusers_dir / "sdxl-refiner"
    assert _import(base, "--refiner", refiner, "--out", out) == 0
    assert (out / "refiner").is_dir()
    capsys.readouterr()

    assert _import(base, "--out", out) == 2
    assert "--force" in capsys.readouterr().err
    assert len(ModelConfig.load(out).stages[0].experts) == 2, "a refused import leaves the model as it was"

    assert _import(base, "--out", out, "--force") == 0
    assert len(ModelConfig.load(out).stages[0].experts) == 1
    assert not (out / "refiner").exists(), "the replaced model's refiner link is gone"
    assert _weights_intact(refiner), "replacing a model directory removes its links, not their targets"
    assert not list(tmp_path.glob(".sdxl.*")), "no staging folder left beside the model"


def test_a_non_empty_folder_that_is_not_a_model_dir_is_never_written(tiny_diffusers_dir, tmp_path, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):
        assert _import(tiny_diffusers_dir / "sd", "--out", out, *force) == 2
        assert "not a model directory" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_variant_only_and_truncated_weights_are_named_at_import(tiny_diffusers_dir, tmp_path):
    from ediffi.importers.diffusers import DiffusersImportError, import_diffusers

    variant = _copy(tiny_diffusers_dir / "sd", tmp_path / "fp16")
    unet = variant / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(DiffusersImportError, match=r"unet: only variant weights \(diffusion_pytorch_model\.fp16"):
        import_diffusers(variant, tmp_path / "out-fp16")

    truncated = _copy(tiny_diffusers_dir / "sd", tmp_path / "truncated")
    weights = truncated / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(DiffusersImportError, match=r"text_encoder/model\.safetensors: not a complete safetensors"):
        import_diffusers(truncated, tmp_path / "out-truncated")
    assert not (tmp_path / "out-fp16").exists() and not (tmp_path / "out-truncated").exists()


def test_invalid_json_and_flags_are_one_line_errors(tiny_diffusers_dir, tmp_path, capsys):
    broken = _copy(tiny_diffusers_dir / "sd", tmp_path / "broken")
    (broken / "unet" / "config.json").write_text("{not json")
    assert _import(broken, "--out", tmp_path / "a") == 2
    assert "unet/config.json: not valid JSON" in capsys.readouterr().err

    base, refiner = tiny_diffusers_dir / "sdxl-base", tiny_diffusers_dir / "sdxl-refiner"
    for value in ("1", "0", "nan", "-0.2"):
        assert _import(base, "--refiner", refiner, "--high-noise-frac", value, "--out", tmp_path / "b") == 2
        assert "--high-noise-frac must be within (0, 1)" in capsys.readouterr().err
    assert _import(tiny_diffusers_dir / "sd", "--high-noise-frac", "0.5", "--out", tmp_path / "c") == 2
    assert "goes with --refiner" in capsys.readouterr().err


def test_the_model_id_is_the_folder_the_cache_repository_or_name(tiny_diffusers_dir, tmp_path):
    snapshot = _copy(tiny_diffusers_dir / "sd", tmp_path / "hub" / "models--org--tiny-sd" / "snapshots" / "0123abcd")
    assert _import(snapshot, "--out", tmp_path / "a") == 0
    assert ModelConfig.load(tmp_path / "a").name == "tiny-sd"
    assert _import(tiny_diffusers_dir / "sd", "--out", tmp_path / "b") == 0
    assert ModelConfig.load(tmp_path / "b").name == "sd"
    assert _import(snapshot, "--out", tmp_path / "c", "--name", "my-model") == 0
    assert ModelConfig.load(tmp_path / "c").name == "my-model"


def test_imported_models_default_to_their_pipelines_steps_and_guidance(imported_sd_dir, imported_sdxl_dir, tmp_path):
    """model.json records each pipeline's own __call__ defaults (read from diffusers' signatures here);
    a model directory imported before it did gets them from its pipeline class; the shipped family its own."""
    import inspect

    from diffusers import (
        StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline,
    )

    from ediffi.config import GenerationDefaults
    from ediffi.spec import DEFAULT_GUIDANCE, DEFAULT_INPAINT_STRENGTH, DEFAULT_SAMPLER, DEFAULT_STEPS

    # SD's folder names PNDMScheduler with skip_prk_steps (SD 1.x's), SDXL's its plain
    # EulerDiscreteScheduler: requests then sample on the scheduler's own timesteps / sigmas.
    # With a mask, the strength of the family's inpaint pipeline (SDXL's is 0.9999).
    cases = (
        (imported_sd_dir, StableDiffusionPipeline, StableDiffusionInpaintPipeline, "pndm"),
        (imported_sdxl_dir, StableDiffusionXLPipeline, StableDiffusionXLInpaintPipeline, "euler"),
    )
    for model_dir, pipeline, inpaint_pipeline, sampler in cases:
        signature = inspect.signature(pipeline.__call__).parameters
        recorded = json.loads((model_dir / "model.json").read_text())["defaults"]
        assert recorded == {
            "steps": signature["num_inference_steps"].default,
            "guidance_scale": signature["guidance_scale"].default,
            "sampler": sampler,
            "use_karras_sigmas": False,
            "inpaint_strength": inspect.signature(inpaint_pipeline.__call__).parameters["strength"].default,
        }
        older = json.loads((model_dir / "model.json").read_text())
        del older["defaults"]  # imported before the importer wrote them: Euler on Karras's sigmas, as then
        assert ModelConfig.model_validate(older).request_defaults == GenerationDefaults(
            **{**recorded, "sampler": "euler", "use_karras_sigmas": True}
        )
        older["training"] = {}
        assert ModelConfig.model_validate(older).request_defaults.model_dump() == {
            "steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE, "sampler": DEFAULT_SAMPLER,
            "use_karras_sigmas": True, "inpaint_strength": DEFAULT_INPAINT_STRENGTH,
        }


# -- sampler dpmpp_2m = diffusers' "DPM++ 2M Karras" ----------------------------
# DPMSolverMultistepScheduler(use_karras_sigmas=True, algorithm_type="dpmsolver++",
# solver_order=2) from the checkpoint's scheduler config: its own conventions,
# not Euler's (ediffi/discrete.py `request_schedule`).

# SD and an SDXL base alone give identical pixels (inf dB, or ~80 dB from a
# 1-LSB difference: diffusers batches [uncond, cond], we [cond, uncond]). With
# the Karras end points and initial noise of DPM-Solver but Euler's fractional
# timesteps they are at 54-58 dB here, so this bar also pins the rounding.
DPM_PARITY_DB = 60.0


def _denoiser_calls(model, sampler: str, steps: int) -> list[tuple[float, float]]:
    """(sigma, UNet timestep) of every UNet call of one unguided request."""
    from ediffi.model import DECODER
    from ediffi.pipeline import GenerationRequest, generate

    calls: list[list[float]] = []
    hooks = []
    for ensemble in model.stages.values():
        for name, expert in ensemble.experts.items():
            if name != DECODER:
                hooks.append(expert.register_forward_pre_hook(
                    lambda m, args, kwargs: calls.append([float(kwargs["sigma"][0])]), with_kwargs=True))
                hooks.append(expert.unet.register_forward_pre_hook(
                    lambda m, args, kwargs: calls[-1].append(float(args[1][0])), with_kwargs=True))
    try:
        generate(model, GenerationRequest("a red cat", steps=steps, guidance_scale=1.0, seed=3, sampler=sampler))
    finally:
        for hook in hooks:
            hook.remove()
    return [tuple(c) for c in calls]


@pytest.mark.parametrize("steps", [5, 12, 30])
def test_dpmpp_2m_calls_the_unet_where_dpm_solver_does_and_euler_is_unchanged(
    tiny_diffusers_dir, imported_sd_dir, imported_sdxl, steps
):
    """dpmpp_2m evaluates at DPMSolverMultistepScheduler's Karras sigmas (the
    whole trained range) with its integer (rounded) timesteps; euler still at
    EulerDiscreteScheduler's sigmas and fractional timesteps. SD ("leading"
    spacing, as SD 1.x's PNDM config) and SDXL base + refiner."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from ediffi.model import load_model

    for folder, model in (("sd", load_model(imported_sd_dir)), ("sdxl-base", imported_sdxl)):
        cfg = json.loads((tiny_diffusers_dir / folder / "scheduler" / "scheduler_config.json").read_text())
        dpm = DPMSolverMultistepScheduler.from_config(
            cfg, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2)
        euler = EulerDiscreteScheduler.from_config(cfg, use_karras_sigmas=True)
        for sampler, reference in (("dpmpp_2m", dpm), ("euler", euler)):
            reference.set_timesteps(steps)
            sigmas, timesteps = map(torch.tensor, zip(*_denoiser_calls(model, sampler, steps)))
            torch.testing.assert_close(sigmas.float(), reference.sigmas[:-1], rtol=1e-6, atol=0)
            if sampler == "dpmpp_2m":
                assert timesteps.tolist() == reference.timesteps.float().tolist(), folder
            else:  # diffusers' Euler takes t of the float64 sigma, we of its float32 rounding
                torch.testing.assert_close(timesteps.double(), reference.timesteps.double(), rtol=0, atol=1e-3)
                assert any(t != round(t) for t in timesteps.tolist()), "the test would not see the rounding"


def _dpmpp_2m(model_dir, steps: int, guidance: float, seed: int = 7, **size):
    from ediffi.model import load_model
    from ediffi.pipeline import GenerationRequest, generate

    request = GenerationRequest("a red cat on the house", steps=steps, guidance_scale=guidance, seed=seed,
                                sampler="dpmpp_2m", **size)
    return generate(load_model(model_dir), request)[0]


@pytest.mark.parametrize("spacing", [None, "linspace"])
def test_sd_dpmpp_2m_matches_dpm_solver_multistep_karras(tiny_diffusers_dir, imported_sd_dir, tmp_path, spacing):
    """SD with dpmpp_2m = StableDiffusionPipeline with DPM++ 2M Karras, same
    seed, steps, guidance. "linspace" spacing (SD 2.x-style configs) is where
    Euler's initial noise scale (sigma_max) and DPM-Solver's (its VP sample,
    sqrt(sigma_max^2 + 1) here) differ."""
    from diffusers import StableDiffusionPipeline

    from ediffi.importers.diffusers import import_diffusers
    from tests.support.diffusers import karras_dpmpp

    folder, model_dir = tiny_diffusers_dir / "sd", imported_sd_dir
    if spacing is not None:
        folder = _copy(folder, tmp_path / "sd")
        config = folder / "scheduler" / "scheduler_config.json"
        original = json.loads(config.read_text())
        config.unlink()  # may be a link into the session's checkpoint
        config.write_text(json.dumps({**original, "timestep_spacing": spacing}))
        model_dir = tmp_path / "m"
        import_diffusers(folder, model_dir)
    pipe = karras_dpmpp(StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True))
    for steps, guidance in ((10, 5.0), (5, 1.0)):
        ref = pipe("a red cat on the house", num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(7)).images[0]
        figure = psnr(_dpmpp_2m(model_dir, steps, guidance), ref)
        print(f"SD ({spacing or 'leading'}) dpmpp_2m parity, {steps} steps, guidance {guidance}: PSNR {figure:.2f} dB")
        assert figure >= DPM_PARITY_DB, (steps, guidance)


@pytest.mark.parametrize("folder", ["sd", "sd-v"])
def test_dpmpp_2m_on_the_schedulers_own_sigmas_matches_dpm_solver_multistep(tiny_diffusers_dir, tmp_path, folder):
    """dpmpp_2m with use_karras_sigmas false = DPMSolverMultistepScheduler.from_config(the folder's
    config, dpmsolver++, order 2): diffusers' default DPM++ 2M, A1111's "DPM++ 2M" (not Karras)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from ediffi.importers.diffusers import import_diffusers
    from ediffi.model import load_model
    from ediffi.pipeline import GenerationRequest, generate

    import_diffusers(tiny_diffusers_dir / folder, tmp_path / "m")
    model = load_model(tmp_path / "m")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir / folder, use_safetensors=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    pipe.set_progress_bar_config(disable=True)
    for steps, guidance in ((10, 5.0), (5, 1.0)):
        request = GenerationRequest("a red cat on the house", steps=steps, guidance_scale=guidance, seed=7,
                                    sampler="dpmpp_2m", use_karras_sigmas=False)
        ref = pipe("a red cat on the house", num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(7)).images[0]
        figure = psnr(generate(model, request)[0], ref)
        print(f"{folder} dpmpp_2m on the scheduler's own sigmas, {steps} steps, guidance {guidance}: PSNR {figure:.2f} dB")
        # v-prediction reaches x0 through alpha/sigma in a different float order than diffusers does,
        # which the tiny random UNet amplifies (with Karras sigmas too: 56 dB at 10 steps, guidance 5).
        assert figure >= (DPM_PARITY_DB if folder == "sd" else PARITY_DB), (steps, guidance)


def test_a_folder_shipping_dpm_solver_defaults_to_it_as_loaded(tiny_diffusers_dir, tmp_path):
    """An SD folder whose scheduler is DPMSolverMultistepScheduler (DPM-Solver++ 2M, its own sigmas):
    requests default to dpmpp_2m on its sigmas, and a prompt, a seed, steps and guidance give the
    image of StableDiffusionPipeline.from_pretrained(folder) as loaded."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from cli.main import main
    from ediffi.importers.diffusers import import_diffusers

    folder = _copy(tiny_diffusers_dir / "sd", tmp_path / "sd")
    config = folder / "scheduler" / "scheduler_config.json"
    original = json.loads(config.read_text())
    config.unlink()  # may be a link into the session's checkpoint
    DPMSolverMultistepScheduler.from_config(original).save_config(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    import_diffusers(folder, tmp_path / "m")
    recorded = json.loads((tmp_path / "m" / "model.json").read_text())["defaults"]
    assert recorded == {"steps": 50, "guidance_scale": 7.5, "sampler": "dpmpp_2m", "use_karras_sigmas": False,
                        "inpaint_strength": 1.0}
    out = tmp_path / "ours.png"
    assert main(["generate", "a red cat on the house", "--model-dir", str(tmp_path / "m"), "--steps", "10",
                 "--guidance", "5", "--seed", "7", "--out", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and not pipe.scheduler.config.use_karras_sigmas
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red cat on the house", num_inference_steps=10, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(7)).images[0]
    print(f"SD with its DPMSolverMultistepScheduler as loaded: PSNR {psnr(Image.open(out), ref):.2f} dB")
    assert psnr(Image.open(out), ref) >= DPM_PARITY_DB


def test_sdxl_dpmpp_2m_matches_dpm_solver_multistep_karras(tiny_diffusers_dir, imported_sdxl_dir, tmp_path):
    """SDXL base alone with dpmpp_2m = StableDiffusionXLPipeline with DPM++ 2M
    Karras (identical pixels); base + refiner = the base pipeline to
    denoising_end=0.8 then the refiner pipeline from denoising_start=0.8,
    whose fresh scheduler takes its first step first order: the imported
    stage restarts the multistep history at the expert boundary as well."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from ediffi.importers.diffusers import import_diffusers
    from tests.support.diffusers import karras_dpmpp

    import_diffusers(tiny_diffusers_dir / "sdxl-base", tmp_path / "base")
    base = karras_dpmpp(StableDiffusionXLPipeline.from_pretrained(
        tiny_diffusers_dir / "sdxl-base", use_safetensors=True, add_watermarker=False))
    refiner = karras_dpmpp(StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_diffusers_dir / "sdxl-refiner", use_safetensors=True, add_watermarker=False))
    prompt, size = "a red cat on the house", dict(width=48, height=32)
    kw = dict(num_inference_steps=10, guidance_scale=5.0)
    seed = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    ref = base(prompt, generator=seed(), **kw, **size).images[0]
    figure = psnr(_dpmpp_2m(tmp_path / "base", 10, 5.0, **size), ref)
    print(f"SDXL base dpmpp_2m parity: PSNR {figure:.2f} dB")
    assert figure >= DPM_PARITY_DB

    latents = base(prompt, denoising_end=0.8, output_type="latent", generator=seed(), **kw, **size).images
    ref = refiner(prompt, image=latents, denoising_start=0.8, generator=seed(), **kw).images[0]
    ours = _dpmpp_2m(imported_sdxl_dir, 10, 5.0, **size)
    assert ours.size == ref.size == (48, 32)
    figure = psnr(ours, ref)
    print(f"SDXL base + refiner dpmpp_2m parity: PSNR {figure:.2f} dB")
    assert figure >= DPM_PARITY_DB


def test_dpmpp_2m_and_euler_rows_share_a_call_and_keep_their_timesteps(imported_sdxl):
    """Batched with euler and heun requests (one UNet call for their rows),
    a dpmpp_2m request gives the image it gives alone, and so do they: each
    row carries its own sampler's timestep (rounded or fractional)."""
    from ediffi.pipeline import GenerationRequest, generate, generate_batch

    requests = [
        GenerationRequest("a red cat on the house", steps=steps, guidance_scale=5.0, seed=11, sampler=sampler,
                          width=48, height=32)
        for sampler, steps in (("dpmpp_2m", 6), ("euler", 6), ("heun", 4))
    ]
    calls = []
    unet = imported_sdxl.stages["base"].experts["base"].unet
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[1].tolist()), with_kwargs=True)
    try:
        together = generate_batch(imported_sdxl, requests)
    finally:
        hook.remove()
    shared = [c for c in calls if len(c) == 6]  # [dpmpp_2m x2, euler x2, heun x2] (cond, uncond rows)
    assert shared and all(c[0] == round(c[0]) for c in shared)
    assert any(c[2] != round(c[2]) for c in shared)
    for request, (image,) in zip(requests, together):
        assert psnr(image, generate(imported_sdxl, request)[0]) >= DPM_PARITY_DB, request.sampler


def test_every_discrete_call_carries_its_timestep_so_a_cuda_graph_needs_no_host_step(imported_sd_dir):
    # A captured CUDA graph cannot run t(sigma) (it reads sigma on the host); the warm-up inputs a graph is
    # captured from, and every request row, bring the timestep the expert would compute, so nothing changes.
    from engines.torch_backend import TorchBackend

    backend = TorchBackend(imported_sd_dir)
    stage = backend.model.config.stages[0]
    expert = backend.model.stages[stage.name].experts[stage.experts[0].name]
    inputs = backend.dummy_inputs(stage.name, 2, sigma=3.0)
    assert inputs.timestep is not None
    assert torch.equal(inputs.timestep, expert.timesteps(inputs.sigma).float())
    with torch.no_grad():
        given = expert(**inputs.as_kwargs())
        inputs.timestep = None
        computed = expert(**inputs.as_kwargs())
    assert torch.equal(given, computed)
    backend.close()

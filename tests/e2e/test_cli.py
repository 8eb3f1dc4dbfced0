"""`ediffi generate` (docs/architecture.md §4), in process through `cli.main.main` and
once as a real `python -m ediffi` subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main

REPO_ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the cores are shared


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # Settings are read from EDIFFI_* at the edge; the caller's shell must not leak in.
    for name in list(os.environ):
        if name.startswith("EDIFFI_"):
            monkeypatch.delenv(name)


@pytest.fixture
def color_map(tmp_path) -> Path:
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 32, 64))
    path = tmp_path / "map.png"
    image.save(path)
    return path


def _generate(model_dir, out, *extra) -> list[str]:
    return ["generate", "a red circle and a blue square", "--model-dir", str(model_dir), "--steps", "2",
            "--sampler", "euler", "--seed", "3", "--out", str(out), *extra]


def test_generate_writes_a_png_of_the_output_size(tiny_model_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(_generate(tiny_model_dir, out)) == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (tiny_model.config.image_size,) * 2
        assert image.mode == "RGB"
    assert str(out) in capsys.readouterr().out


def test_generate_n_writes_one_file_per_image(tiny_model_dir, tmp_path):
    out = tmp_path / "sub" / "batch.png"
    assert main(_generate(tiny_model_dir, out, "--n", "2")) == 0
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == ["batch-0.png", "batch-1.png"]


def test_paint_with_words(tiny_model_dir, tmp_path, color_map):
    plain, painted = tmp_path / "plain.png", tmp_path / "painted.png"
    assert main(_generate(tiny_model_dir, plain)) == 0
    assert main(_generate(tiny_model_dir, painted, "--paint", str(color_map), "--region", "#ff0000=red circle:1.5")) == 0
    a = np.asarray(Image.open(plain)).astype(int)
    b = np.asarray(Image.open(painted)).astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() > 8
    # The default strength form works too.
    assert main(_generate(tiny_model_dir, tmp_path / "d.png", "--paint", str(color_map), "--region", "#ff0000=red circle")) == 0


def test_unknown_phrase_is_exit_code_2_naming_it(tiny_model_dir, tmp_path, color_map, capsys):
    out = tmp_path / "x.png"
    code = main(_generate(tiny_model_dir, out, "--paint", str(color_map), "--region", "#ff0000=purple house"))
    assert code == 2
    err = capsys.readouterr().err
    assert "purple house" in err and "paint_with_words.regions[0].phrase" in err
    assert not out.exists()


def test_colour_missing_from_the_map_is_exit_code_2(tiny_model_dir, tmp_path, color_map, capsys):
    code = main(_generate(tiny_model_dir, tmp_path / "x.png", "--paint", str(color_map), "--region", "#00ff00=red circle"))
    assert code == 2
    assert "#00ff00" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--region", "#ff0000=red circle"], ["--paint"]),
        (["--paint", "map.png"], ["--region"]),
        (["--paint", "map.png", "--region", "red circle"], ["--region", "red circle"]),
    ],
    ids=["region-without-map", "map-without-region", "bad-region-form"],
)
def test_bad_paint_arguments_are_exit_code_2(tiny_model_dir, tmp_path, capsys, extra, words):
    assert main(_generate(tiny_model_dir, tmp_path / "x.png", *extra)) == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words)


def test_missing_model_dir_is_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(_generate(missing, tmp_path / "x.png")) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err
    assert not (tmp_path / "x.png").exists()


def test_model_dir_from_the_environment(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDIFFI_MODEL_DIR", str(tiny_model_dir))
    out = tmp_path / "env.png"
    assert main(["generate", "a red circle", "--steps", "1", "--out", str(out)]) == 0
    assert out.is_file()


def test_python_dash_m_ediffi(tiny_model_dir, tiny_model, tmp_path):
    out = tmp_path / "sub.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDIFFI_")}
    env.update(EDIFFI_MODEL_DIR=str(tiny_model_dir), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "ediffi", "generate", "a red circle", "--steps", "2", "--guidance", "2",
         "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (tiny_model.config.image_size,) * 2

    # Argument errors from argparse are exit code 2 as well.
    result = subprocess.run(
        [sys.executable, "-m", "ediffi", "generate", "x", "--sampler", "lms"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "lms" in result.stderr


def test_an_out_file_pillow_cannot_write_is_refused_before_sampling(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import ediffi.pipeline

    def never(*args, **kwargs):
        raise AssertionError("sampled before the output name was checked")

    monkeypatch.setattr(ediffi.pipeline, "generate", never)
    assert main(_generate(tiny_model_dir, tmp_path / "out")) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_diffusers_folder_as_model_dir_says_to_import_it(tmp_path, capsys):
    folder = tmp_path / "stable-diffusion-v1-5"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert main(_generate(folder, tmp_path / "x.png")) == 2
    assert f"ediffi import diffusers {folder}" in capsys.readouterr().err


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails a test whose command loads the model: its errors must come first."""
    import engines.engine

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(engines.engine, "make_backend", never)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--width", "4096"), ["width", "within [8, 2048]"]),  # EDIFFI_MAX_IMAGE_SIDE, as the server
        (("--height", "60"), ["height", "multiple of 8"]),
        (("--steps", "0"), ["steps", ">= 1"]),
        (("--no-karras-sigmas", "--sampler", "heun"), ["use_karras_sigmas", "goes with sampler euler, dpmpp_2m"]),
        (("--karras-sigmas", "--sampler", "ddim"), ["use_karras_sigmas", "own timesteps"]),
    ],
)
def test_request_errors_come_before_the_model_loads(imported_sd_dir, tmp_path, capsys, no_model_loading, extra, words):
    assert main(_generate(imported_sd_dir, tmp_path / "x.png", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(word in err for word in words), err
    assert str(2**63 - 1) not in err


def test_a_style_image_of_extreme_shape_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys,
                                                                          no_model_loading):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (400, 2)).save(strip)
    assert main(_generate(tiny_model_dir, tmp_path / "x.png", "--style-image", str(strip))) == 2
    assert "style_image" in capsys.readouterr().err


def test_an_imported_model_samples_with_its_pipelines_defaults(imported_sd_dir, tmp_path, capsys):
    """No --steps/--guidance/--sampler: StableDiffusionPipeline's own 50 steps and guidance 7.5, with
    the PNDM scheduler its folder ships (SD 1.x's), exactly as when they are given (so not the shipped
    family's 32 Heun steps at 3)."""
    base = ["generate", "a red circle", "--model-dir", str(imported_sd_dir), "--seed", "3"]
    assert main([*base, "--out", str(tmp_path / "defaults.png")]) == 0
    assert main([*base, "--steps", "50", "--guidance", "7.5", "--sampler", "pndm", "--out", str(tmp_path / "named.png")]) == 0
    assert main([*base, "--out", str(tmp_path / "shipped.png"), "--steps", "32", "--guidance", "3", "--sampler", "heun"]) == 0
    defaults, named, shipped = (np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("defaults", "named", "shipped"))
    assert np.array_equal(defaults, named)
    assert not np.array_equal(defaults, shipped)


def test_seed_minus_one_is_a_random_seed_printed(tiny_model_dir, tmp_path, capsys):
    def generate(seed: str, out: Path) -> None:
        assert main(["generate", "a red circle", "--model-dir", str(tiny_model_dir), "--steps", "2", "--sampler",
                     "euler", "--seed", seed, "--out", str(out)]) == 0

    seeds = []
    for name in ("a", "b"):
        generate("-1", tmp_path / f"{name}.png")
        err = capsys.readouterr().err
        seeds.append(int(err.split("seed: ")[1].split()[0]))
    assert seeds[0] != seeds[1] and all(0 <= seed < 2**31 for seed in seeds)
    generate(str(seeds[0]), tmp_path / "again.png")  # the printed seed reproduces the image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "again.png")))


def test_generate_inpaints_with_a_mask(imported_sdxl_dir, imported_sdxl, tmp_path, capsys):
    """--init-image with --mask: the reference pipeline's inpainting at the model's default strength
    (SDXL's 0.9999); a mask without its image, or of another size, exits 2 naming mask."""
    from ediffi.pipeline import GenerationRequest, generate

    init, mask, out = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (24, 1))).convert("RGB").save(init)
    box = np.zeros((24, 40), dtype=np.uint8)
    box[4:20, 8:32] = 255
    Image.fromarray(box).save(mask)
    args = ["generate", "a red cat", "--model-dir", str(imported_sdxl_dir), "--steps", "4", "--seed", "5",
            "--sampler", "euler", "--no-karras-sigmas", "--init-image", str(init)]
    assert main([*args, "--mask", str(mask), "--out", str(out)]) == 0
    (expected,) = generate(imported_sdxl, GenerationRequest(
        "a red cat", steps=4, seed=5, sampler="euler", use_karras_sigmas=False, guidance_scale=5.0,
        init_image=Image.open(init), mask=Image.open(mask),
    ))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    # --padding-mask-crop: the region around the mask at 32 x 32, pasted back: the init image's size
    assert main([*args, "--mask", str(mask), "--padding-mask-crop", "2", "--width", "32", "--height", "32",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (40, 24)
    capsys.readouterr()
    Image.fromarray(box[:12, :20]).save(mask)
    assert main([*args, "--mask", str(mask), "--out", str(out)]) == 2
    assert "mask" in capsys.readouterr().err
    assert main([*args[:-2], "--mask", str(mask), "--out", str(out)]) == 2
    assert "mask: goes with an init_image" in capsys.readouterr().err

"""`bash bench/gpu.sh --dry-run`: the GPU benchmark's own entry point and
stages on CPU with tiny models, importing only what the GPU machine's image
has plus the carried wheels (see bench/gpu.sh). Also the bench CLI's switch
for CUDA graphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_script_dry_run_runs_every_stage(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    names = [s["stage"] for s in summary["stages"]]
    assert names == ["model", "env", "tests", "percall-eager", "percall-cuda_graphs", "engine-cuda_graphs",
                     "engine-eager", "percall-torch_compile", "tensorrt", "realsize"]
    assert all(s["result"] == "ok" for s in summary["stages"]), summary
    stage = {name: json.loads((out / f"{name}.json").read_text()) for name in names}

    # Imports came from the carried wheels (or their stand-ins) and the image, never this venv's site-packages.
    for module, where in stage["env"]["imported_from"].items():
        assert "not importable" not in where and str(Path(sys.prefix)) not in where, (module, where)
    assert stage["tests"]["exit_code"] == 0 and stage["tests"]["counts"].get("skipped", 0) >= 8

    experts = {"base/base0", "base/base1", "sr/sr0"}
    rows = stage["percall-eager"]["rows"]
    assert set(rows) == experts and all(set(r) == {"1", "2", "4"} for r in rows.values())
    assert all(cell["ms_per_call"] > 0 for r in rows.values() for cell in r.values())
    for name in ("percall-cuda_graphs", "engine-cuda_graphs", "percall-torch_compile"):
        assert stage[name]["status"] == "skipped" and "needs a CUDA device" in stage[name]["reason"]

    engine = stage["engine-eager"]
    assert engine["status"] == "ok" and set(engine["results"]) == {"2"}
    results = engine["results"]["2"]
    assert [r["policy"] for r in results] == ["step", "request", "none"]
    assert all(r["requests"] == 6 and r["failed"] == 0 and 0 < r["efficiency"] for r in results)
    assert "step_over_none_throughput" in engine["summary"]["2"]

    trt = stage["tensorrt"]
    assert trt["status"] == "skipped" and "TensorRT" in trt["reason"] or "tensorrt" in trt["reason"]
    assert set(trt["half_precision_graphs"]) == experts
    realsize = stage["realsize"]
    if realsize["status"] == "skipped":  # no diffusers (or importer) in this interpreter
        assert "diffusers" in realsize["reason"]
    else:
        entry = realsize["results"]["tiny-sd"]
        assert [r["policy"] for r in entry["ours"]["1"]] == ["step", "request", "none"]
        assert entry["diffusers"]["one_at_a_time"]["images_per_s"] > 0 and entry["diffusers"]["best_static_batch"]


@pytest.mark.parametrize("arch, params_millions", [("sd15", 859.5), ("sdxl", 2567.5)])
def test_real_size_unet_configs_are_the_published_architectures(arch, params_millions):
    """bench/configs/<arch>/unet/config.json builds (on the meta device: no
    memory, no weights) a UNet of the published parameter count."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = json.loads((ROOT / "bench" / "configs" / arch / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    count = sum(p.numel() for p in unet.parameters()) / 1e6
    assert abs(count - params_millions) < 1.0, count


def test_bench_engine_cuda_graphs_flag_reaches_the_backend(tiny_model_dir):
    parser = build_parser()
    assert parser.parse_args(["bench", "engine", "--cuda-graphs"]).compile == "cuda_graphs"
    assert parser.parse_args(["bench", "engine", "--compile", "torch_compile"]).compile == "torch_compile"
    assert parser.parse_args(["bench", "engine"]).compile == "none"
    from bench.engine_bench import main as bench_main

    args = parser.parse_args(["bench", "engine", "--cuda-graphs", "--device", "cpu", "--model-dir", str(tiny_model_dir)])
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        bench_main(args, None)

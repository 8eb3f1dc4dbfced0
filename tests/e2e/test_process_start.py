"""Start-up of `ediffi api | worker | serve` as real processes: a wrong setting stops the process at once
with one line naming the variable (exit 2, no traceback), before any model loads; the API process loads
no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = REPO / "models" / "default"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # never connected to: every case stops before


def run_ediffi(args: list[str], code: str | None = None, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDIFFI_")}
    clean.update(env, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "ediffi", *args]
    return subprocess.run(command, cwd=REPO, env=clean, capture_output=True, text=True, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    for word in words:
        assert word in output, output
    return output


@pytest.mark.parametrize(("variable", "value", "words"), [
    ("EDIFFI_MAX_BATCH", "abc", ["EDIFFI_MAX_BATCH", "valid integer"]),
    ("EDIFFI_PORT", "99999", ["EDIFFI_PORT", "65535"]),
    ("EDIFFI_REDIS_URL", "garbage", ["EDIFFI_REDIS_URL", "redis://"]),
    ("EDIFFI_REDIS_URL", "redis://:s3cret@host:notaport/0", ["EDIFFI_REDIS_URL", "port"]),
    ("EDIFFI_DEVICE", "gpu0", ["EDIFFI_DEVICE"]),
])
@pytest.mark.parametrize("command", ["api", "worker", "serve"])
def test_an_invalid_setting_is_one_line_naming_it(command, variable, value, words):
    result = run_ediffi([command], **{variable: value, "EDIFFI_ALLOW_ANONYMOUS": "true"})
    output = assert_refused(result, *words)
    assert len(output.strip().splitlines()) == 1, output
    assert "s3cret" not in output, "a Redis password is never repeated"


@pytest.mark.parametrize(("values", "words"), [
    # Renewed every heartbeat interval, a claim that times out sooner is taken from a healthy worker: two
    # workers took one job from each other until it failed at max_deliveries.
    ({"EDIFFI_CLAIM_TIMEOUT_S": "1", "EDIFFI_HEARTBEAT_INTERVAL_S": "3"}, ["EDIFFI_CLAIM_TIMEOUT_S", "EDIFFI_HEARTBEAT_INTERVAL_S"]),
    ({"EDIFFI_HEARTBEAT_TTL_S": "2"}, ["EDIFFI_HEARTBEAT_TTL_S", "EDIFFI_HEARTBEAT_INTERVAL_S"]),
])
def test_claim_and_heartbeat_timeouts_must_outlast_a_heartbeat_interval(values, words):
    result = run_ediffi(["worker"], EDIFFI_REDIS_URL=UNREACHABLE_REDIS, **values)
    output = assert_refused(result, *words)
    assert len(output.strip().splitlines()) == 1, output


def test_the_api_alone_needs_redis_instead_of_accepting_jobs_no_worker_can_reach():
    result = run_ediffi(["api"], EDIFFI_ALLOW_ANONYMOUS="true")
    assert_refused(result, "EDIFFI_REDIS_URL", "ediffi serve")


@pytest.mark.parametrize("command", ["api", "worker", "serve"])
def test_a_missing_model_dir_stops_the_process_before_anything_loads(command, tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_ediffi([command], EDIFFI_MODEL_DIR=str(missing), EDIFFI_REDIS_URL=UNREACHABLE_REDIS,
                        EDIFFI_ALLOW_ANONYMOUS="true")
    assert_refused(result, str(missing), "does not exist", "EDIFFI_MODEL_DIR")


@pytest.mark.parametrize("command", ["api", "worker", "serve"])
def test_model_dir_flag_overrides_the_environment(command, tmp_path):
    # The flag `generate` has, on every role: EDIFFI_MODEL_DIR names the shipped model, the flag a folder
    # without a model.json (a diffusers pipeline folder), which stops the process with the import hint.
    (tmp_path / "model_index.json").write_text("{}")
    result = run_ediffi([command, "--model-dir", str(tmp_path)], EDIFFI_MODEL_DIR=str(SHIPPED_MODEL),
                        EDIFFI_REDIS_URL=UNREACHABLE_REDIS, EDIFFI_ALLOW_ANONYMOUS="true")
    assert_refused(result, str(tmp_path), "model.json", "ediffi import diffusers", "--model-dir")


def test_an_invalid_model_json_names_its_fields(tmp_path):
    (tmp_path / "model.json").write_text('{"stages": 3}')
    result = run_ediffi(["api"], EDIFFI_MODEL_DIR=str(tmp_path), EDIFFI_REDIS_URL=UNREACHABLE_REDIS,
                        EDIFFI_ALLOW_ANONYMOUS="true")
    assert_refused(result, "invalid model.json", "stages", "encoders")


@pytest.mark.skipif(sys.platform != "linux", reason="CUDA availability as on the CI machine")
@pytest.mark.parametrize("command", ["worker", "serve"])
def test_a_cuda_device_this_machine_lacks_stops_the_process_before_the_model_loads(command):
    import torch

    device = f"cuda:{torch.cuda.device_count()}"  # one past the last device, so also on a GPU machine
    result = run_ediffi([command], EDIFFI_DEVICE=device, EDIFFI_REDIS_URL=UNREACHABLE_REDIS,
                        EDIFFI_ALLOW_ANONYMOUS="true")
    output = assert_refused(result, f"EDIFFI_DEVICE={device}")
    assert "worker metrics on" not in output and "ready" not in output


def test_the_api_process_imports_no_torch():
    # The whole `ediffi api` start-up path up to the server loop (uvicorn's Server.serve replaced by a probe).
    code = (
        "import sys, uvicorn\n"
        "async def probe(self, *args, **kwargs): print('torch' in sys.modules, 'transformers' in sys.modules)\n"
        "uvicorn.Server.serve = probe\n"
        "from cli.main import main\n"
        "main(['api', '--port', '8999'])\n"
    )
    result = run_ediffi([], code=code, EDIFFI_REDIS_URL=UNREACHABLE_REDIS, EDIFFI_ALLOW_ANONYMOUS="true")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False", result.stdout

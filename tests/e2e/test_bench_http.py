"""`ediffi bench http`: the engine bench's load as valid HTTP requests, and one small
end-to-end run that starts redis, the API and a worker itself and prints the documented
JSON keys (the same as `ediffi bench engine`'s, plus the end-to-end/engine ratios)."""

from __future__ import annotations

import json

import pytest

from cli.main import build_parser
from bench.engine_bench import LoadConfig, synthetic_requests
from bench.http_bench import request_body
from server.schemas import GenerateRequest
from server.settings import Settings
from server.validation import validate_generation

ENGINE_BENCH_KEYS = {
    "policy", "backend", "throughput_images_per_s", "latency_p50_s", "latency_p95_s", "latency_p99_s",
    "mean_batch_size", "efficiency",
}


def test_the_engine_bench_load_is_valid_http_input():
    load = LoadConfig(requests=24, p_paint=0.5, p_style=0.5, seed=3)
    requests = synthetic_requests(load, image_size=64)
    settings = Settings(redis_url=None, api_keys=[])
    kinds = set()
    for request in requests:
        body = request_body(request)
        validated = validate_generation(GenerateRequest.model_validate(body), settings)
        assert validated.params["prompt"] == request.prompt and validated.params["seed"] == request.seed
        assert validated.params["steps"] == request.steps and validated.params["sampler"] == request.sampler
        kinds |= {"paint"} if "paint_with_words" in body else set()
        kinds |= {"style"} if "style_image" in body else set()
    assert kinds == {"paint", "style"}  # the load exercises both extensions


def test_cli_flags_mirror_bench_engine():
    engine = build_parser().parse_args(["bench", "engine", "--clients", "3", "--requests", "5", "--json"])
    http = build_parser().parse_args(["bench", "http", "--clients", "3", "--requests", "5", "--json"])
    assert (http.clients, http.requests, http.json) == (engine.clients, engine.requests, engine.json) == (3, 5, True)
    shared = {"min_steps", "max_steps", "seed", "threads", "max_batch", "max_active", "backend", "dtype", "policies"}
    assert shared <= set(vars(engine)) & set(vars(http))


@pytest.mark.slow  # starts a worker process (> 20 s on a loaded 2-core machine)
@pytest.mark.timeout(300)
def test_bench_http_end_to_end_prints_the_engine_bench_keys(tiny_model_dir, capsys):
    args = build_parser().parse_args([
        "bench", "http", "--clients", "2", "--requests", "4", "--min-steps", "2", "--max-steps", "3",
        "--threads", "1", "--max-active", "4", "--model-dir", str(tiny_model_dir), "--json",
    ])
    assert args.func(args, Settings(redis_url=None)) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert ENGINE_BENCH_KEYS <= set(result)
    assert result["policy"] == "step" and result["failed"] == 0 and result["images"] == 4
    assert result["throughput_images_per_s"] > 0 and result["mean_batch_size"] >= 1
    assert 0 < result["efficiency"] < 5
    assert result["latency_p50_s"] <= result["latency_p95_s"] <= result["latency_p99_s"]
    assert "worker_row_budget" in result and result["cpu_s"]["workers"] > 0
    # The worker reports the engine's own latency; end to end cannot be faster.
    assert 0 < result["engine_latency_p50_s"] <= result["latency_p50_s"] and result["latency_ratio_p50"] >= 1


BENCH_KEY = "bench-key-5f1c0e8a9b7d4c2e"


@pytest.fixture(scope="module")
def keyed_cluster(tiny_model_dir, tmp_path_factory):
    """A real deployment's access rules: API keys required (no anonymous access)."""
    from tests.support.process import Cluster

    cluster = Cluster(tiny_model_dir, tmp_path_factory.mktemp("bench-keyed-logs"),
                      settings={"api_keys": BENCH_KEY, "allow_anonymous": False}, persistent=False)
    try:
        yield cluster.start(workers=1)
    finally:
        cluster.close()


def bench_url_argv(cluster, tiny_model_dir, *extra: str) -> list[str]:
    return ["bench", "http", "--url", cluster.api.url, "--metrics-url", cluster.workers[0].metrics_url,
            "--clients", "1", "--requests", "2", "--min-steps", "2", "--max-steps", "2", "--threads", "1",
            "--no-calibrate", "--model-dir", str(tiny_model_dir), "--json", *extra]


@pytest.mark.slow  # starts redis, an API and a worker process
@pytest.mark.timeout(300)
def test_bench_http_against_a_keyed_api_sends_the_key_from_the_environment(keyed_cluster, tiny_model_dir, capsys,
                                                                          monkeypatch):
    """Before, `bench http --url` never sent a key: every real deployment answered 401."""
    monkeypatch.setenv("EDIFFI_BENCH_API_KEY", BENCH_KEY)
    args = build_parser().parse_args(bench_url_argv(keyed_cluster, tiny_model_dir))
    assert args.func(args, Settings(redis_url=None)) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["failed"] == 0 and result["images"] == 2, result["errors"]
    # --api-key works as well (and wins over the environment).
    monkeypatch.setenv("EDIFFI_BENCH_API_KEY", "not-the-key")
    args = build_parser().parse_args(bench_url_argv(keyed_cluster, tiny_model_dir, "--api-key", BENCH_KEY))
    assert args.func(args, Settings(redis_url=None)) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_refused_warm_up_is_one_error_line_without_a_traceback(keyed_cluster, tiny_model_dir):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDIFFI_")}
    result = subprocess.run([sys.executable, "-m", "ediffi", *bench_url_argv(keyed_cluster, tiny_model_dir)],
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "401" in errors[0] and "--api-key" in errors[0], result.stderr
    assert result.stdout == ""


def test_the_redis_url_the_bench_reports_hides_its_password(monkeypatch, tmp_path):
    """`start_service` says which Redis it uses; the URL's password stays out of that line."""
    import bench.http_bench as http_bench

    class NoProcess:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def stop(self) -> None:
            pass

    monkeypatch.setattr(http_bench, "_Child", NoProcess)
    monkeypatch.setattr(http_bench, "_wait_ready", lambda *args, **kwargs: None)
    lines: list[str] = []
    settings = Settings(redis_url="redis://:Sup3rSecretPw@127.0.0.1:16383/0")
    service = http_bench.start_service(settings, tmp_path, {}, 0, lines.append)
    service.close()
    (line,) = [line for line in lines if "EDIFFI_REDIS_URL" in line]
    assert "Sup3rSecretPw" not in line and "127.0.0.1:16383/0" in line, line
    settings = Settings(redis_url="rediss://bench:Sup3rSecretPw@redis.internal:6380/2")
    lines.clear()
    http_bench.start_service(settings, tmp_path, {}, 0, lines.append).close()
    assert "Sup3rSecretPw" not in lines[0] and "bench:" in lines[0] and "redis.internal:6380/2" in lines[0], lines

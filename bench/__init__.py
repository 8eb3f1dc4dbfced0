"""Benchmarks: `ediffi bench engine` (bench.engine_bench), `ediffi bench http` (bench.http_bench), the GPU
script's stages (bench.gpu_stages) and the soak test (bench.soak). Above the service layer,
below the command line (docs/architecture.md §2)."""

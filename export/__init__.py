"""PyTorch -> ONNX -> TensorRT, with a manifest per artifact and parity
checks against PyTorch (docs/architecture.md §2, §3).

- `export.onnx_export.export_onnx(model_dir, out_dir)`: every expert of every
  stage, and the T5 / CLIP towers, as ONNX graphs (`ediffi export onnx`).
- `export.parity`: per-graph errors and whole-image PSNR, ONNX Runtime vs
  PyTorch (`ediffi export check`).
- `export.tensorrt_build`: optimization profiles from batch buckets, the
  engine cache key, stale-engine refusal and the build driver
  (`ediffi export tensorrt`); every TensorRT call lives in
  `export/trt_runtime.py`.
- `export.manifest`: the manifest schema and the checks every backend runs
  before it loads an artifact.

Heavy imports (torch.onnx, onnx, onnxruntime, tensorrt) happen inside the
functions that need them.
"""

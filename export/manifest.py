"""Artifact manifests: what an exported graph or a built engine was made from.

Every artifact (an ONNX graph, a TensorRT engine) lives in its own folder
with a `manifest.json` beside it (docs/architecture.md §3):

    <onnx_dir>/<stage>/<expert>/model.onnx + manifest.json     (denoisers)
    <onnx_dir>/encoders/<t5|clip_text|clip_vision>/model.onnx + manifest.json
    <trt_dir>/<stage>/<expert>/engine-<key>.plan + manifest.json

A manifest records the source (the weights file and its sha256, the network
config, the stage's resolution and the expert's sigma range), the tensors
(names, dtypes, shapes with a symbolic batch axis), the batch profile, the
opset and the exporter's versions, and the sha256 of the artifact itself. A
backend calls `check_denoiser` / `check_encoder` before it loads anything and
refuses an artifact that does not match the model directory, naming each
difference and the command that fixes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ediffi.config import ExpertConfig, ModelConfig, StageConfig
from ediffi.model import weights_hash

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
FORMAT_VERSION = 1
BATCH = "batch"  # the symbolic name of the dynamic batch axis
ENCODERS_DIR = "encoders"
ENCODER_KINDS = ("t5", "clip_text", "clip_vision")


class ManifestMismatch(ValueError):
    """An artifact does not belong to this model directory (or is stale)."""


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    dtype: str  # numpy-style: float32, float16, bool, int64
    shape: list[int | str]  # BATCH for the dynamic batch axis


class BatchRange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min: int = 1
    opt: int | None = None
    max: int | None = None  # None: unbounded (ONNX dynamic axis)


class SourceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # relative to the model directory
    sha256: str


class TensorRTInfo(BaseModel):
    """What a TensorRT engine is tied to besides its ONNX source."""

    model_config = ConfigDict(extra="forbid")

    version: str
    gpu_name: str
    compute_capability: str
    precision: str  # fp16 | bf16 | fp32
    buckets: list[int]
    cache_key: str
    onnx_manifest_sha256: str
    workspace_bytes: int | None = None


class ArtifactManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    kind: Literal["denoiser", "encoder", "tensorrt_engine"]
    artifact: str  # file name, relative to the manifest's folder
    artifact_sha256: str = ""
    model_name: str = ""
    # Denoisers (and their engines).
    stage: str | None = None
    expert: str | None = None
    sigma_lo: float | None = None
    sigma_hi: float | None = None  # None: infinity
    sigma_data: float | None = None
    image_size: int | None = None
    channels: int | None = None
    super_resolution: bool | None = None
    network: dict[str, Any] | None = None
    # Encoders.
    encoder: str | None = None
    sequence_length: int | None = None
    source: SourceFile
    dtype: str = "float32"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batch: BatchRange = Field(default_factory=BatchRange)
    opset: int | None = None
    exporter: dict[str, Any] = Field(default_factory=dict)
    tensorrt: TensorRTInfo | None = None
    created_at: float = Field(default_factory=time.time)

    # -- I/O ---------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path) -> ArtifactManifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ManifestMismatch(f"{Path(folder)} has no {MANIFEST}: it is not an exported artifact (or its export did not finish)")
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as exc:
            raise ManifestMismatch(f"{path} is not a valid manifest: {str(exc)[:300]}") from None

    def save(self, folder: str | Path) -> Path:
        """Write atomically: a half-written manifest never exists."""
        path = Path(folder) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def sha256(self) -> str:
        """Identity of what the manifest describes (creation time excluded):
        the TensorRT engine cache key includes it."""
        data = self.model_dump(mode="json", exclude={"created_at"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    @property
    def sigma_hi_value(self) -> float:
        return math.inf if self.sigma_hi is None else self.sigma_hi

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def denoiser_dir(root: str | Path, stage: str, expert: str) -> Path:
    return Path(root) / stage / expert


def encoder_dir(root: str | Path, kind: str) -> Path:
    return Path(root) / ENCODERS_DIR / kind


def encoder_weights(config: ModelConfig, kind: str) -> str:
    """The weights file of an encoder tower, relative to the model dir."""
    folder = {"t5": config.encoders.t5.path, "clip_text": config.encoders.clip_text.path,
              "clip_vision": config.encoders.clip_vision.path}[kind]
    return f"{folder}/model.safetensors"


# -- what a model directory expects -------------------------------------------


def expected_denoiser(model_dir: Path, config: ModelConfig, stage: StageConfig, expert: ExpertConfig,
                      hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest fields an artifact of this expert must carry."""
    return {
        "kind": "denoiser",
        "stage": stage.name,
        "expert": expert.name,
        "sigma_lo": expert.sigma_lo,
        "sigma_hi": expert.sigma_hi,
        "sigma_data": config.sigma_data,
        "image_size": stage.image_size,
        "channels": stage.channels,
        "super_resolution": stage.is_super_resolution,
        "network": expert.network.model_dump(mode="json"),
        "source": {"path": expert.weights, "sha256": _hash(model_dir, expert.weights, hashes)},
    }


def expected_encoder(model_dir: Path, config: ModelConfig, kind: str, hashes: dict[str, str] | None = None) -> dict[str, Any]:
    weights = encoder_weights(config, kind)
    expected: dict[str, Any] = {
        "kind": "encoder",
        "encoder": kind,
        "source": {"path": weights, "sha256": _hash(model_dir, weights, hashes)},
    }
    if kind == "t5":
        expected["sequence_length"] = config.encoders.t5.max_length
    elif kind == "clip_text":
        expected["sequence_length"] = config.encoders.clip_text.max_length
    return expected


def _hash(model_dir: Path, relative: str, hashes: dict[str, str] | None) -> str:
    if hashes is not None and relative in hashes:
        return hashes[relative]
    if not (Path(model_dir) / relative).is_file():
        raise FileNotFoundError(f"model directory {model_dir} has no {relative}")
    value = weights_hash(Path(model_dir), relative)
    if hashes is not None:
        hashes[relative] = value
    return value


def differences(manifest: ArtifactManifest, expected: dict[str, Any]) -> list[str]:
    """Human-readable field differences (empty: the manifest matches)."""
    found = manifest.model_dump(mode="json")
    out = []
    for key, want in expected.items():
        have = found.get(key)
        if key == "source":
            if have["sha256"] != want["sha256"]:
                out.append(
                    f"source weights {want['path']}: the artifact was made from sha256 {have['sha256'][:12]}… "
                    f"({have['path']}), the model directory has sha256 {want['sha256'][:12]}…"
                )
            continue
        if key == "network" and have != want:
            keys = sorted(k for k in set(have or {}) | set(want) if (have or {}).get(k) != want.get(k))
            out.append(f"network config differs in {keys}")
            continue
        if have != want:
            out.append(f"{key}: artifact has {have!r}, model directory has {want!r}")
    return out


def check_artifact(folder: Path, manifest: ArtifactManifest, expected: dict[str, Any], *, dtype: str | None,
                   fix: str, verify_file: bool = True) -> None:
    """Raise ManifestMismatch naming every difference, and how to fix it."""
    problems = differences(manifest, expected)
    if dtype is not None and manifest.dtype != dtype:
        problems.append(f"dtype: artifact is {manifest.dtype}, the backend runs {dtype}")
    if manifest.format_version != FORMAT_VERSION:
        problems.append(f"manifest format {manifest.format_version}, this code reads format {FORMAT_VERSION}")
    artifact = folder / manifest.artifact
    if not artifact.is_file():
        problems.append(f"artifact file {artifact} is missing")
    elif verify_file and manifest.artifact_sha256 and file_sha256(artifact) != manifest.artifact_sha256:
        problems.append(f"artifact file {artifact} was changed after export (sha256 differs from its manifest)")
    if problems:
        what = manifest.stage + "/" + manifest.expert if manifest.stage else (manifest.encoder or manifest.artifact)
        raise ManifestMismatch(
            f"refusing {manifest.kind} artifact {what} at {folder}: it does not match the model directory:\n  - "
            + "\n  - ".join(problems) + f"\nfix: {fix}"
        )


def load_checked_denoiser(root: Path, model_dir: Path, config: ModelConfig, stage: StageConfig, expert: ExpertConfig,
                          *, dtype: str | None, fix: str, hashes: dict[str, str] | None = None) -> tuple[Path, ArtifactManifest]:
    folder = denoiser_dir(root, stage.name, expert.name)
    if not (folder / MANIFEST).is_file():
        raise ManifestMismatch(
            f"no exported graph for stage {stage.name!r} expert {expert.name!r}: {folder / MANIFEST} is missing\nfix: {fix}"
        )
    manifest = ArtifactManifest.load(folder)
    check_artifact(folder, manifest, expected_denoiser(model_dir, config, stage, expert, hashes), dtype=dtype, fix=fix)
    return folder / manifest.artifact, manifest


def load_checked_encoder(root: Path, model_dir: Path, config: ModelConfig, kind: str, *, fix: str,
                         hashes: dict[str, str] | None = None) -> tuple[Path, ArtifactManifest] | None:
    """None when the encoder was not exported (the backend then keeps torch)."""
    folder = encoder_dir(root, kind)
    if not (folder / MANIFEST).is_file():
        return None
    manifest = ArtifactManifest.load(folder)
    check_artifact(folder, manifest, expected_encoder(model_dir, config, kind, hashes), dtype=None, fix=fix)
    return folder / manifest.artifact, manifest


def find_manifests(root: str | Path, kind: str | None = None) -> list[tuple[Path, ArtifactManifest]]:
    """Every artifact folder under root (sorted), optionally of one kind."""
    out = []
    for path in sorted(Path(root).glob(f"**/{MANIFEST}")):
        manifest = ArtifactManifest.load(path.parent)
        if kind is None or manifest.kind == kind:
            out.append((path.parent, manifest))
    return out

"""Export parity over every option of the network config, and on a tiny
random model with the shipped model's shape of options.

Graphs are exported as `ediffi export onnx` exports them by default (with
the onnxslim pass when it is installed: it is what folded the shipped base
experts' coordinate channels to a constant, issue 14), then run by ONNX
Runtime against PyTorch: the ONNX graph, and the float32 graph a TensorRT
engine would be built from (float64 stripped). Limit: 1e-4 of the output's
scale (a correct float32 export gives ~1e-6)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cli.main import main as cli_main
from ediffi.config import (
    EncodersConfig,
    ExpertConfig,
    ModelConfig,
    StageConfig,
    TextEncoderConfig,
    UNetConfig,
    VisionEncoderConfig,
)
from ediffi.edm import EDMDenoiser
from ediffi.model import EDiffIModel, ExpertEnsemble
from engines.onnx_backend import BoundSession, OrtExpert, load_onnx_model
from export.manifest import denoiser_dir
from export.onnx_export import (
    DenoiserGraph,
    denoiser_args,
    export_expert,
    random_denoiser_inputs,
    simplify_available,
    verify_graph,
)
from export.parity import GRAPH_MAX_REL, check_graphs, check_tensorrt_inputs, errors, tensorrt_input_parity

TEXT_LENGTH = 6  # tokens per encoder: the context has 2 * TEXT_LENGTH columns


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Every field of UNetConfig takes at least two values across these networks
# (test_every_network_option_is_covered_by_an_export_parity_test), so each
# option that shapes the graph is traced, simplified and run at least once
# away from its default. (name, stage image size, stage channels, network)
NETWORK_VARIANTS: list[tuple[str, int, int, UNetConfig]] = [
    ("shipped-base-like", 16, 3, UNetConfig(
        model_channels=8, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[8, 4], num_heads=4,
        context_dim=24, pooled_dim=12, embedding_dim=32, groups=8, coord_channels=True)),
    ("shipped-sr-like", 16, 3, UNetConfig(
        low_res_channels=3, model_channels=8, channel_mult=[1, 2, 2], attention_resolutions=[4], num_heads=4,
        context_dim=24, pooled_dim=12, embedding_dim=32, groups=8)),
    ("sr-with-coords-two-blocks", 8, 3, UNetConfig(
        low_res_channels=3, model_channels=12, channel_mult=[1, 2], num_res_blocks=2, attention_resolutions=[8],
        num_heads=3, context_dim=10, pooled_dim=6, embedding_dim=16, fourier_scale=4.0, dropout=0.1, groups=4,
        coord_channels=True)),
    ("one-channel-no-attention-levels", 8, 1, UNetConfig(
        in_channels=1, out_channels=1, model_channels=8, channel_mult=[2], attention_resolutions=[], num_heads=1,
        context_dim=8, pooled_dim=4, embedding_dim=8, groups=2)),
]


def _variant_model(tmp_path, name: str, image_size: int, channels: int, network: UNetConfig) -> EDiffIModel:
    """A one-expert base (or SR) stage with random weights around `network`."""
    sr = bool(network.low_res_channels)
    stage = StageConfig(
        name="sr" if sr else "base", image_size=image_size, channels=channels, low_res_aug_sigma=0.05 if sr else 0.0,
        experts=[ExpertConfig(name=name, sigma_lo=0.0, weights=f"{name}.safetensors", network=network)],
    )
    # An SR stage needs a base stage before it (not exported here).
    base = StageConfig(name="base", image_size=image_size // 2, channels=channels, experts=[
        ExpertConfig(name="base0", sigma_lo=0.0, weights="base0.safetensors", network=UNetConfig(in_channels=channels, out_channels=channels))])
    config = ModelConfig(
        name=f"variant-{name}", stages=[base, stage] if sr else [stage],
        encoders=EncodersConfig(t5=TextEncoderConfig(path="t5", max_length=TEXT_LENGTH),
                                clip_text=TextEncoderConfig(path="clip_text", max_length=TEXT_LENGTH),
                                clip_vision=VisionEncoderConfig(path="clip_vision")),
    )
    torch.manual_seed(len(name))
    net = EDMDenoiser(network, image_size, config.sigma_data).eval()
    nn.init.normal_(net.net.out_conv.weight, std=0.05)  # zero-initialised: F would not show in the output
    return EDiffIModel(config, None, {stage.name: ExpertEnsemble(stage, {name: net}).eval()}, tmp_path)


@pytest.mark.parametrize("name,image_size,channels,network", NETWORK_VARIANTS, ids=[v[0] for v in NETWORK_VARIANTS])
def test_network_option_export_parity(tmp_path, name, image_size, channels, network):
    model = _variant_model(tmp_path, name, image_size, channels, network)
    stage = model.config.stages[-1]
    expert = stage.experts[0]
    manifest = export_expert(model, stage, expert, tmp_path / "onnx", source_sha256="-", simplify=simplify_available())
    session = BoundSession(denoiser_dir(tmp_path / "onnx", stage.name, name) / manifest.artifact, manifest,
                           torch.device("cpu"), threads=1)
    ort_net, ref_net = OrtExpert(session, torch.float32), model.stages[stage.name].experts[name]
    for rows in (1, 3):
        inputs = random_denoiser_inputs(model.config, stage, expert, rows, seed=rows)
        with torch.no_grad():
            ref = ref_net(*denoiser_args(inputs, stage.is_super_resolution))
        assert errors(ort_net(**inputs.as_kwargs()), ref)[1] <= GRAPH_MAX_REL["float32"], (name, rows)
    # The graph TensorRT would be built from, too.
    results = tensorrt_input_parity(model, stage, expert, tmp_path / "onnx", rows=(1, 3))
    assert len(results) == 2
    for r in results:
        assert r.max_rel <= GRAPH_MAX_REL["float32"], r


def test_every_network_option_is_covered_by_an_export_parity_test():
    """A new UNetConfig field fails here until a NETWORK_VARIANTS entry gives
    it a second value, i.e. until its graph is checked against PyTorch."""
    uncovered = []
    for field, info in UNetConfig.model_fields.items():
        values = {json.dumps(getattr(net, field)) for *_, net in NETWORK_VARIANTS}
        values.add(json.dumps(info.get_default(call_default_factory=True)))
        if len(values) < 2:
            uncovered.append(field)
    assert not uncovered, f"network options without an export-parity test at a non-default value: {uncovered}"
    # Both states of every switch, including the one issue 14 was about.
    assert {net.coord_channels for *_, net in NETWORK_VARIANTS} == {True, False}
    assert {bool(net.low_res_channels) for *_, net in NETWORK_VARIANTS} == {True, False}


# -- a tiny random model with the shipped model's shape of options ---------------------


@pytest.fixture(scope="module")
def shipped_shape_export(shipped_shape_model_dir, tmp_path_factory):
    """Exported through the CLI with its defaults (onnxslim on when installed);
    the experts only (the encoders are checked on the tiny and shipped models)."""
    onnx_dir = tmp_path_factory.mktemp("shipped-shape-onnx")
    assert cli_main(["export", "onnx", "--model-dir", str(shipped_shape_model_dir), "--out", str(onnx_dir),
                     "--no-encoders"]) == 0
    return shipped_shape_model_dir, onnx_dir


@pytest.mark.slow
def test_shipped_shape_model_export_parity(shipped_shape_export, shipped_shape_model):
    model_dir, onnx_dir = shipped_shape_export
    onnx_model = load_onnx_model(model_dir, onnx_dir, threads=1)
    results = check_graphs(shipped_shape_model, onnx_model, rows=(1, 5))
    results += check_tensorrt_inputs(shipped_shape_model, onnx_dir, rows=(1, 5))
    experts = {f"{s.name}/{e.name}" for s in shipped_shape_model.config.stages for e in s.experts}
    assert len(experts) == 5
    assert {r.name for r in results} == experts | {f"tensorrt-input/{e}" for e in experts}
    for r in results:
        assert r.ok and r.max_rel <= GRAPH_MAX_REL["float32"], r


def test_export_refuses_a_graph_that_differs_from_pytorch(tmp_path):
    """The exporter runs each finished graph against its module before it
    writes the manifest: a graph that computes something else is refused."""
    name, image_size, channels, network = NETWORK_VARIANTS[-1]
    model = _variant_model(tmp_path, name, image_size, channels, network)
    stage = model.config.stages[-1]
    manifest = export_expert(model, stage, stage.experts[0], tmp_path / "onnx", source_sha256="-", simplify=False)
    path = denoiser_dir(tmp_path / "onnx", stage.name, name) / manifest.artifact
    net = model.stages[stage.name].experts[name]
    args = denoiser_args(random_denoiser_inputs(model.config, stage, stage.experts[0], 3, seed=4), False)
    names = manifest.input_names()
    verify_graph(path, DenoiserGraph(net, False), args, names, "float32")  # the module it was exported from
    with torch.no_grad():
        net.net.out_conv.weight.mul_(1.01)  # a 1% drift of one layer
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        verify_graph(path, DenoiserGraph(net, False), args, names, "float32")

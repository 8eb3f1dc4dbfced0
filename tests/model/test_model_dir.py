"""The model directory (docs/architecture.md §3): `model.json` + safetensors + tokenizer
files, loaded offline, with errors that name what is wrong."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from ediffi.config import MODEL_JSON, ModelConfig
from ediffi.model import SHIPPED_SHAPE_SPEC, build_random_model_dir, load_model, tiny_model_config
from ediffi.pipeline import GenerationRequest, encode_request


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the cores are shared


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model directory, free to be broken."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub is told so, and any connection attempt fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access attempted while loading a model directory")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _edit_model_json(model_dir: Path, edit) -> None:
    path = model_dir / MODEL_JSON
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_layout(tiny_model_dir):
    config = ModelConfig.load(tiny_model_dir)
    for stage in config.stages:
        for expert in stage.experts:
            assert (tiny_model_dir / expert.weights).is_file() and expert.weights.endswith(".safetensors")
    for folder in (config.encoders.t5.path, config.encoders.clip_text.path):
        assert (tiny_model_dir / folder / "tokenizer.json").is_file()
    assert (tiny_model_dir / config.encoders.clip_vision.path / "preprocessor_config.json").is_file()


@torch.no_grad()
def test_copied_directory_loads_offline_and_matches(model_copy, tiny_model, offline):
    model = load_model(model_copy)
    assert model.model_dir == model_copy
    assert model.config == tiny_model.config
    assert set(model.stages) == {s.name for s in model.config.stages}
    for name, ensemble in model.stages.items():
        assert set(ensemble.experts) == {e.name for e in model.config.stage(name).experts}
        for expert_name, expert in ensemble.experts.items():
            reference = tiny_model.stages[name].experts[expert_name].state_dict()
            for key, value in expert.state_dict().items():
                assert torch.equal(value, reference[key]), f"{name}/{expert_name}: {key}"
    # The copy conditions exactly as the original.
    request = GenerationRequest("a red circle", guidance_scale=1.0)
    a, b = encode_request(model, request), encode_request(tiny_model, request)
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)


def test_build_is_deterministic_per_seed(tmp_path):
    first = build_random_model_dir(tmp_path / "a", seed=3)
    second = build_random_model_dir(tmp_path / "b", seed=3)
    config = ModelConfig.load(first)
    weights = config.stages[0].experts[0].weights
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    assert ModelConfig.load(second) == config


def test_shipped_shape_spec_mirrors_the_shipped_models_options():
    """The shipped-shape test model keeps the shipped model's shape of options
    (experts and their boundaries, levels, attention layout relative to the
    stage size, heads, tokens, coordinate channels, encoders); only sizes differ."""
    shipped = ModelConfig.load(Path(__file__).resolve().parents[2] / "models" / "default")
    tiny = tiny_model_config(SHIPPED_SHAPE_SPEC)

    def shape(config: ModelConfig):
        stages = []
        for stage in config.stages:
            net = stage.experts[0].network
            assert all(e.network == net for e in stage.experts), "one network shape per stage"
            levels = [stage.image_size // 2**i for i in range(len(net.channel_mult))]
            stages.append(dict(
                name=stage.name,
                experts=[(e.sigma_lo, e.sigma_hi) for e in stage.experts],
                levels=len(net.channel_mult),
                attention_at_levels=[i for i, r in enumerate(levels) if r in net.attention_resolutions],
                heads=net.num_heads, coord_channels=net.coord_channels,
                low_res=net.low_res_channels > 0, low_res_aug=stage.low_res_aug_sigma > 0,
            ))
        encoders = config.encoders
        return stages, (encoders.t5.max_length, encoders.clip_text.max_length, encoders.clip_vision is not None)

    assert shape(tiny) == shape(shipped)


def test_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_model(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)


def test_missing_model_json_names_the_file(model_copy):
    (model_copy / MODEL_JSON).unlink()
    with pytest.raises(FileNotFoundError, match=MODEL_JSON) as err:
        load_model(model_copy)
    assert str(model_copy) in str(err.value)


def test_missing_expert_weights_names_the_file(model_copy):
    expert = ModelConfig.load(model_copy).stages[0].experts[-1]
    (model_copy / expert.weights).unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_model(model_copy)
    assert expert.weights in str(err.value)
    assert expert.name in str(err.value)


@pytest.mark.parametrize("encoder", ["t5", "clip_text"])
def test_missing_tokenizer_names_the_file_and_folder(model_copy, encoder):
    folder = getattr(ModelConfig.load(model_copy).encoders, encoder).path
    (model_copy / folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as err:
        load_model(model_copy)
    assert folder in str(err.value)


def test_missing_image_processor_config(model_copy):
    folder = ModelConfig.load(model_copy).encoders.clip_vision.path
    (model_copy / folder / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_model(model_copy)


def _drop_attention(data):
    # The weights hold attention layers this config no longer has.
    data["stages"][0]["experts"][0]["network"]["attention_resolutions"] = []


def _wider(data):
    # Same layer names, different shapes.
    data["stages"][0]["experts"][0]["network"]["model_channels"] = 32


@pytest.mark.parametrize(
    "edit",
    [
        _drop_attention,
        _wider,
    ],
    ids=["missing-layers", "wrong-shapes"],
)
def test_weights_not_matching_the_network_config(model_copy, edit):
    expert = ModelConfig.load(model_copy).stages[0].experts[0]
    _edit_model_json(model_copy, edit)
    with pytest.raises(ValueError) as err:
        load_model(model_copy)
    message = str(err.value)
    assert expert.weights in message and expert.name in message
    assert "match" in message


def test_overlapping_experts_are_a_validation_error(model_copy):
    def overlap(data):
        experts = data["stages"][0]["experts"]
        high = min(experts, key=lambda e: e["sigma_hi"] is not None)  # sigma_hi null: the top expert
        high["sigma_lo"] = high["sigma_lo"] / 2  # now below the lower expert's sigma_hi

    _edit_model_json(model_copy, overlap)
    with pytest.raises(ValidationError, match="overlap"):
        ModelConfig.load(model_copy)
    with pytest.raises(ValidationError, match="overlap"):
        load_model(model_copy)


def test_unknown_model_json_key_is_rejected(model_copy):
    _edit_model_json(model_copy, lambda data: data["stages"][0].update(sampler="ddim"))
    with pytest.raises(ValidationError, match="sampler"):
        ModelConfig.load(model_copy)


def test_model_config_round_trip(tiny_model_dir, tmp_path):
    config = ModelConfig.load(tiny_model_dir)
    config.save(tmp_path)
    again = ModelConfig.load(tmp_path)
    assert again == config
    assert again.model_dump() == config.model_dump()
    assert json.loads((tmp_path / MODEL_JSON).read_text()) == json.loads(config.model_dump_json())
    assert again.image_size == config.stages[-1].image_size


@torch.no_grad()
def test_encoders_load_through_stock_transformers_classes(tiny_model_dir):
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
        T5EncoderModel,
    )

    config = ModelConfig.load(tiny_model_dir)
    enc = config.encoders
    t5 = T5EncoderModel.from_pretrained(tiny_model_dir / enc.t5.path, local_files_only=True)
    clip_text = CLIPTextModelWithProjection.from_pretrained(tiny_model_dir / enc.clip_text.path, local_files_only=True)
    clip_vision = CLIPVisionModelWithProjection.from_pretrained(tiny_model_dir / enc.clip_vision.path, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(tiny_model_dir / enc.clip_vision.path, local_files_only=True)
    t5_tok = AutoTokenizer.from_pretrained(tiny_model_dir / enc.t5.path, local_files_only=True)
    clip_tok = AutoTokenizer.from_pretrained(tiny_model_dir / enc.clip_text.path, local_files_only=True)

    network = config.stages[0].experts[0].network
    assert t5.config.d_model + clip_text.config.hidden_size == network.context_dim
    assert clip_text.config.projection_dim + clip_vision.config.projection_dim == network.pooled_dim

    ids = t5_tok(["a red circle"], return_tensors="pt")
    assert t5(**ids).last_hidden_state.shape == (1, ids["input_ids"].shape[1], t5.config.d_model)
    ids = clip_tok(["a red circle"], return_tensors="pt")
    assert clip_text(**ids).text_embeds.shape == (1, clip_text.config.projection_dim)
    from PIL import Image

    pixels = processor(images=[Image.new("RGB", (40, 30), (10, 200, 30))], return_tensors="pt")["pixel_values"]
    assert clip_vision(pixel_values=pixels).image_embeds.shape == (1, clip_vision.config.projection_dim)

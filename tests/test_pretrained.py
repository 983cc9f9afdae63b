"""The model's identity (models/config.py, models/pretrained.py): configs, checkpoints and model
folders rebuild the same model; `predict` is the argmax of `forward`."""
import json
import os
import zipfile

import pytest
import torch

from models import PRESETS, SegmenterConfig, build_model, create_segmenter, load_pretrained
from models.config import ConfigError
from models import export_model_folder
from models.pretrained import config_from_checkpoint, save_pretrained
from models.pretrained import read_model_source
from tests.test_presets import small_vpd  # noqa: F401  (a fixture)
from tests.test_weights import _perturbed_tiny, _vpd_layout_state
from utils.errors import InputError
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

TOKEN_LENGTH = 10


def inputs(batch=2, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    return torch.randint(0, 49406, (batch, TOKEN_LENGTH), generator=generator), images


def test_config_validates_and_round_trips(tmp_path):
    config = SegmenterConfig(preset="tiny", token_length=TOKEN_LENGTH, img_size=64, attn_grad=True)
    assert SegmenterConfig.from_dict(config.to_dict()) == config
    config.save(tmp_path / "config.json")
    assert SegmenterConfig.load(tmp_path / "config.json") == config
    for bad, message in (({"token_length": 1}, r"token_length must be an integer in \[2, 512\], got 1"),
                         ({"img_size": 0}, r"img_size must be an integer in \[16, 2048\], got 0"),
                         ({"attn_grad": "yes"}, "attn_grad must be true or false"),
                         ({"decoder_hidden": -4}, r"decoder_hidden must be an integer in \[1, 4096\], got -4"),
                         ({"no_target_area": 1.0}, r"no_target_area must be a fraction in \[0, 1\)"),
                         ({"no_target_area": True}, "no_target_area must be a fraction")):
        with pytest.raises(ConfigError, match=message):
            SegmenterConfig(preset="tiny", **bad)
    with pytest.raises(ConfigError, match="settings this version does not know: colour"):
        SegmenterConfig.from_dict({"preset": "tiny", "colour": "red"})


def test_a_config_saved_before_no_target_area_loads_with_the_empty_mask_rule():
    values = SegmenterConfig(preset="tiny", token_length=TOKEN_LENGTH).to_dict()
    del values["no_target_area"]
    assert SegmenterConfig.from_dict(values).no_target_area == 0.0


def test_predict_empties_masks_no_larger_than_no_target_area():
    model = create_segmenter("tiny", token_length=TOKEN_LENGTH, img_size=64).eval()
    # Logits with foreground on the first 0, 10, 100 and 1000 pixels of a 64 x 64 output.
    areas = torch.tensor([0, 10, 100, 1000])
    logits = torch.zeros(4, 2, 64, 64)
    logits[:, 1].view(4, -1)[:] = torch.where(torch.arange(64 * 64) < areas[:, None], 1.0, -1.0)
    model.forward = lambda *args, **kwargs: logits
    input_ids, images = inputs(batch=4)
    plain = model.predict(input_ids, images=images)
    assert plain.flatten(1).sum(1).tolist() == areas.tolist()  # 0 (default): the argmax itself
    model.config = model.config.replace(no_target_area=100 / (64 * 64))  # at most 100 pixels
    ruled = model.predict(input_ids, images=images)
    assert ruled.flatten(1).sum(1).tolist() == [0, 0, 0, 1000]
    assert torch.equal(ruled[3], plain[3])


def test_the_model_keeps_its_resolved_config():
    model = create_segmenter("tiny", token_length=TOKEN_LENGTH)
    assert model.config.decoder_hidden == PRESETS["tiny"].decoder_hidden == 32
    assert model.config.token_length == model.token_length
    assert build_model(model.config).config == model.config


def test_checkpoint_config_rebuilds_the_same_model(tmp_path):
    """checkpoint -> config -> an identical model with identical logits."""
    model = _perturbed_tiny(TOKEN_LENGTH)
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": model.checkpoint_state_dict(), "config": model.config.to_dict()}, str(path))
    rebuilt = load_pretrained(path)
    assert rebuilt.config == model.config
    input_ids, images = inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids, images=images), model.eval()(input_ids, images=images))


def test_older_checkpoints_without_config_read_their_args():
    state = {"model": create_segmenter("tiny", token_length=TOKEN_LENGTH).state_dict(),
             "args": {"model": "tiny", "token_length": TOKEN_LENGTH, "img_size": 64,
                      "attn_grad": True, "sd_path": None}}
    assert config_from_checkpoint(state) == SegmenterConfig(preset="tiny", token_length=TOKEN_LENGTH,
                                                            img_size=64, attn_grad=True)
    del state["args"]["img_size"]
    with pytest.raises(CheckpointError, match="has no 'config' and its 'args' lack img_size"):
        config_from_checkpoint(state, "old.pth")


def test_model_folder_is_bit_identical_and_holds_no_pickle(tmp_path):
    model = _perturbed_tiny(TOKEN_LENGTH)
    save_pretrained(model, tmp_path / "model")
    assert sorted(os.listdir(tmp_path / "model")) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "model" / "config.json").read_text())["token_length"] == TOKEN_LENGTH
    with open(tmp_path / "model" / "model.safetensors", "rb") as handle:  # safetensors, not a zip of pickles
        header_length = int.from_bytes(handle.read(8), "little")
        assert json.loads(handle.read(header_length))["__metadata__"] == {"format": "pt"}
    assert not zipfile.is_zipfile(tmp_path / "model" / "model.safetensors")
    loaded = type(model).from_pretrained(tmp_path / "model")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    input_ids, images = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids, images=images), model.eval()(input_ids, images=images))


def test_a_model_without_its_frozen_weights_needs_sd_path(tmp_path, small_vpd, monkeypatch):
    """A folder of a model whose VAE / CLIP come from Stable Diffusion stores neither (the vpd
    preset's record, at toy size: tests/test_presets.py)."""
    _, sd_folder, model = small_vpd
    folder = tmp_path / "model"
    save_pretrained(model, folder)
    config = SegmenterConfig.load(folder / "config.json")
    SegmenterConfig.save(config.replace(sd_path=None), folder / "config.json")  # moved machines
    frozen = tuple(f"{name}." for name in model.frozen_module_names)
    assert not any(key.startswith(frozen) for key in read_model_source(folder).weights)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="does not store the vpd_small model's frozen backbone.vae, "
                                         "text_encoder weights.* pass --sd_path"):
        load_pretrained(folder)
    assert load_pretrained(folder, sd_path=sd_folder).config.sd_path == str(sd_folder)


def test_vpd_released_checkpoint_exports_to_a_loadable_folder(tmp_path):
    source_model = _perturbed_tiny(TOKEN_LENGTH)
    path = tmp_path / "vpd_ris_toy.pth"
    # As VPD saves it: its own key names, its args (a Namespace in the real files), no config.
    save_checkpoint({"model": _vpd_layout_state(source_model), "optimizer": {}, "epoch": 39,
                     "args": {"token_length": TOKEN_LENGTH, "img_size": 64}}, str(path))
    config = config_from_checkpoint(load_checkpoint(str(path)), str(path))
    assert (config.preset, config.token_length, config.img_size) == ("tiny", TOKEN_LENGTH, 64)
    export_model_folder(path, tmp_path / "folder")
    loaded = load_pretrained(tmp_path / "folder")
    assert loaded.config.no_target_area == 0.0
    # The exported folder may record a no-target rule chosen after training (bench/no_target_rule.py).
    export_model_folder(path, tmp_path / "ruled", no_target_area=0.005)
    assert load_pretrained(tmp_path / "ruled").config.no_target_area == 0.005
    input_ids, images = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids, images=images), source_model.eval()(input_ids, images=images))
    other = tmp_path / "other.pth"
    save_checkpoint({"model": _vpd_layout_state(source_model), "args": {"token_length": TOKEN_LENGTH + 1}}, str(other))
    with pytest.raises(CheckpointError, match="does not fit a tiny model with token_length 11"):
        export_model_folder(other, tmp_path / "other")


def test_predict_is_the_argmax_of_forward():
    model = _perturbed_tiny(TOKEN_LENGTH)
    input_ids, images = inputs(batch=3)
    with torch.no_grad():
        logits = model(input_ids, images=images)
        masks = model.predict(input_ids, images=images)
        assert masks.dtype == torch.bool and torch.equal(masks, logits.argmax(1).bool())
        big = model.predict(input_ids, images=images, output_size=(100, 90))
        upsampled = torch.nn.functional.interpolate(logits, size=(100, 90), mode="bilinear", align_corners=False)
        assert big.shape == (3, 100, 90) and torch.equal(big, upsampled.argmax(1).bool())

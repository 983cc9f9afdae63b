"""Model presets (models/registry.py) and the one load path (models/pretrained.py): a preset
defined in this file alone trains, saves and reloads; a model whose frozen weights would be random
refuses to load through every entry point; every source layout reads back."""
import ast
import contextlib
import dataclasses
import json
import os
import re
import shutil

import pytest
import torch
from transformers import CLIPTextConfig

from data.loaders import build_dataset
from data.tokenizer import CLIPTokenizer
from engine.args import get_parser, parse_args
from engine.inference import ReferringSegmenter
from models import (PRESETS, Preset, Recipe, SegmenterConfig, VPDSegmenter, build_model, build_model_on_meta,
                    get_preset, register_preset)
from models.presets.tiny import TINY_CLIP_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG
from models.registry import random_components
from models.weights import ACCEPTED_SD_LAYOUTS, SD15_CONFIG_DIR
from tests.programs import load_program, main_here, train_command
from tests.test_weights import _vpd_layout_state
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.errors import InputError
from utils.paths import REPO_ROOT

TOKEN_LENGTH = 10


@contextlib.contextmanager
def registered(preset):
    """The preset registered for the duration of a test (the registry is process-wide)."""
    register_preset(preset)
    try:
        yield preset
    finally:
        PRESETS.pop(preset.name, None)


def perturb(model, seed=5):
    """Trainable weights moved off their initial values, so that loading them is observable."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def logits_of(model, token_length=TOKEN_LENGTH, size=32, pad_id=None, grad=False):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, size, size, generator=generator) * 2 - 1
    tokenizer = CLIPTokenizer(token_length, pad_id)
    input_ids = torch.stack([tokenizer("the red circle")[0], tokenizer("the smaller blue shape")[0]])
    with torch.set_grad_enabled(grad):
        return model(input_ids, images=images)


# ------------------------------------------------------------- a new model family, in this file
# Stable Diffusion 2.x's shape at toy size: per-level attention head widths, linear projections in
# the transformer blocks, a GELU text encoder that pads with 0 (OpenCLIP's tokenizer), and latents
# scaled before the UNet.
SD2_LIKE_UNET = dict(TINY_UNET_CONFIG, attention_head_dim=(2, 4, 4, 8), use_linear_projection=True,
                     cross_attention_dim=48)
SD2_LIKE_CLIP = dict(TINY_CLIP_CONFIG, hidden_size=48, intermediate_size=96, hidden_act="gelu", pad_token_id=0)


def sd2_like_components():
    return random_components(SD2_LIKE_UNET, TINY_VAE_CONFIG, SD2_LIKE_CLIP, seed=11)


SD2_LIKE = Preset(
    name="sd2_like_tiny",
    description="an SD 2-like model at toy size, defined by tests/test_presets.py",
    pretrained_components=lambda sd_path, clip_path: sd2_like_components(),
    random_components=sd2_like_components,
    decoder_hidden=24,
    pad_token_id=0,
    latent_scale=0.5,
    recipe=Recipe(lr=2e-3, weight_decay_rule="modern", epochs=1, batch_size=4),
)


def test_a_preset_defined_in_a_test_file_trains_saves_and_reloads_bit_identically(toy_root, tmp_path):
    with registered(SD2_LIKE):
        output = tmp_path / "ckpt"
        assert main_here("train.py", train_command(toy_root, output, 1, "--model", SD2_LIKE.name,
                                                   "--cache_latents", str(tmp_path / "cache"))[2:]) == 0
        checkpoint = output / "checkpoint_last_toy.pth"
        state = load_checkpoint(str(checkpoint))
        assert state["config"]["preset"] == SD2_LIKE.name and state["config"]["pad_token_id"] == 0
        assert state["schedule"]["weight_decay_rule"] == "modern"  # the preset's recipe

        loaded = VPDSegmenter.from_pretrained(checkpoint)
        loaded.save_pretrained(tmp_path / "folder")
        from_folder = VPDSegmenter.from_pretrained(tmp_path / "folder")
        reference = build_model(SegmenterConfig.from_dict(state["config"]))
        fresh = {key: value.clone() for key, value in reference.state_dict().items()}
        reference.load_state_dict(state["model"])  # every tensor: this preset ships its frozen parts
        reference.eval()
        assert any(not torch.equal(fresh[key], value) for key, value in state["model"].items())  # trained

        expected = logits_of(reference, token_length=16, pad_id=0)
        assert torch.equal(logits_of(loaded, token_length=16, pad_id=0), expected)
        assert torch.equal(logits_of(from_folder, token_length=16, pad_id=0), expected)
        # Its facts in use: latents scaled by 0.5 (cached ones too), sentences padded with 0.
        assert loaded.latent_scale == 0.5
        generator = torch.Generator().manual_seed(1)
        images = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
        input_ids = CLIPTokenizer(16, pad_id=0)("the red circle")[0][None]
        with torch.no_grad():
            latents = loaded.encode_images(images)
            scaled = loaded(input_ids, latents=latents)
            assert torch.equal(scaled, loaded(input_ids, images=images))
            loaded.latent_scale = 1.0
            assert torch.equal(scaled, loaded(input_ids, latents=latents * 0.5))
        item = build_dataset(toy_root, "toy", "unc", "val", loaded.config, eval_mode=True)[0]
        padding = item["attention_mask"] == 0
        assert padding.any() and (item["input_ids"][padding] == 0).all()


def test_frozen_modules_are_the_presets():
    """A preset that trains its VAE encoder and text encoder (as EVP does) gets their gradients,
    stores them, and is refused a latent cache."""
    trains_all = dataclasses.replace(SD2_LIKE, name="trains_all", frozen_modules=())
    with registered(trains_all):
        model = build_model(SegmenterConfig(preset="trains_all", token_length=16, img_size=32)).train()
        assert model.frozen_module_names == ()
        logits_of(model, token_length=16, grad=True).sum().backward()
        for part in (model.text_encoder, model.backbone.vae.encoder):
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters() if p.ndim > 1)
        assert any(key.startswith("text_encoder.") for key in model.checkpoint_state_dict())
        from engine.latents import attach_latent_cache
        with pytest.raises(InputError, match="trains its VAE, so its latents change every step"):
            attach_latent_cache(model, [], "unused", torch.device("cpu"), torch.float32, 1, False)
    vpd = build_model_on_meta("vpd", token_length=40)
    assert not any(p.requires_grad for name in ("backbone.vae", "text_encoder")
                   for p in vpd.get_submodule(name).parameters())


# --------------------------------------------------- frozen weights that would be random: refused
def every_entry_point(checkpoint, tmp_path, toy_root, sd_path=None):
    """Each public way to load a checkpoint, as a call; what each returns shows it loaded."""
    checkpoint = str(checkpoint)
    weights = ["--sd_path", str(sd_path)] if sd_path else []
    image = os.path.join(toy_root, "toy", "images", "toy_000001.jpg")
    app = load_program("app.py")
    export = load_program("tools/export_model.py")
    return {
        "test.py": lambda: main_here("test.py", [
            "--dataset", "toy", "--refer_data_root", toy_root, "--checkpoint", checkpoint, "--workers", "0",
            "--split", "val", "--cache_latents", "none", "--results_json", str(tmp_path / "results.json"),
            *weights]),
        "demo.py": lambda: main_here("demo.py", ["--checkpoint", checkpoint, "--image", image, "--text",
                                                 "the red shape", "--out", str(tmp_path / "overlay.png"), *weights]),
        "app.py": lambda: app.load_model(parse_args("app", ["--checkpoint", checkpoint, "--device", "cpu", *weights])),
        "ReferringSegmenter.from_pretrained": lambda: ReferringSegmenter.from_pretrained(
            checkpoint, sd_path=sd_path, device="cpu")(image, "the red shape"),
        "VPDSegmenter.from_pretrained": lambda: VPDSegmenter.from_pretrained(checkpoint, sd_path=sd_path),
        "tools/export_model.py": lambda: export.main([checkpoint, str(tmp_path / "exported"), *weights]),
    }


def missing_message(checkpoint, preset, modules, cwd, exported=False):
    why = "exports a model folder without" if exported else "does not store"
    return (f"{checkpoint} {why} the {preset} model's frozen {modules} weights, which come from Stable "
            f"Diffusion v1.5: pass --sd_path (sd_path= in Python); the default ./stable-diffusion-v1-5 "
            f"does not exist in {cwd}; expected {ACCEPTED_SD_LAYOUTS}")


def configs_only_sd_folder(folder):
    """SD v1.5's diffusers layout with its configs and no weights: enough for the meta device."""
    for part in ("unet", "vae", "text_encoder"):
        (folder / part).mkdir(parents=True)
        shutil.copy(SD15_CONFIG_DIR / part / "config.json", folder / part / "config.json")
    return folder


def test_vpd_release_without_sd_path_is_refused_by_every_entry_point(tmp_path, toy_root, monkeypatch):
    """VPD's released layout at the real sizes (each tensor one stored value, broadcast), with
    random values: without the Stable Diffusion weights its CLIP would be random."""
    meta_model = build_model_on_meta("vpd", token_length=40)
    state = {key: torch.zeros(()).expand(value.shape) for key, value in _vpd_layout_state(meta_model).items()}
    checkpoint = tmp_path / "vpd_ris_refcoco.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 39, "args": {"token_length": 40}}, checkpoint)
    assert checkpoint.stat().st_size < 2**20
    monkeypatch.chdir(tmp_path)
    for name, load in every_entry_point(checkpoint, tmp_path, toy_root).items():
        with pytest.raises(InputError) as error:
            load()
        exported = name == "tools/export_model.py"
        expected = missing_message(checkpoint, "vpd", "backbone.vae, text_encoder" if exported else "text_encoder",
                                   tmp_path, exported)
        assert str(error.value) == expected, name

    # With the weights it loads (here on the meta device: SD's configs, no 4 GB of weights).
    model = VPDSegmenter.from_pretrained(checkpoint, sd_path=configs_only_sd_folder(tmp_path / "sd"),
                                         device="meta")
    assert model.config.sd_path == str(tmp_path / "sd") and model.config.token_length == 40
    assert sum(p.numel() for p in model.backbone.unet.parameters()) == pytest.approx(859.5e6, rel=0.01)
    # The default path is the working directory's ./stable-diffusion-v1-5, used when it exists.
    configs_only_sd_folder(tmp_path / "stable-diffusion-v1-5")
    assert VPDSegmenter.from_pretrained(checkpoint, device="meta").config.sd_path == \
        str(tmp_path / "stable-diffusion-v1-5")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(InputError, match=f"the default ./stable-diffusion-v1-5 does not exist in {elsewhere};"):
        VPDSegmenter.from_pretrained(checkpoint, device="meta")


# The vpd preset's record at toy size: its weights rule, default path, VPD layout and tokenizer,
# small components read from a Stable Diffusion folder in diffusers' layout.
SMALL_SD_UNET = dict(TINY_UNET_CONFIG, block_out_channels=(24, 32, 32, 32))


def small_sd_components(seed=0):
    return random_components(SMALL_SD_UNET, TINY_VAE_CONFIG, TINY_CLIP_CONFIG, seed=seed)


@pytest.fixture
def small_vpd(tmp_path):
    """(the preset, a Stable Diffusion folder of its size, a trained model of it)."""
    preset = dataclasses.replace(get_preset("vpd"), name="vpd_small", random_components=small_sd_components,
                                 decoder_hidden=16)
    sd_folder = tmp_path / "sd"
    for part, module in zip(("unet", "vae", "text_encoder"), small_sd_components(seed=3)):
        module.save_pretrained(sd_folder / part)
    with registered(preset):
        model = build_model(SegmenterConfig(preset="vpd_small", token_length=TOKEN_LENGTH, img_size=32,
                                            sd_path=str(sd_folder)))
        yield preset, sd_folder, perturb(model)


@pytest.mark.parametrize("layout", ["vpd", "ours"])
def test_a_model_without_its_frozen_weights_loads_only_with_sd_path(small_vpd, tmp_path, toy_root, layout,
                                                                    monkeypatch):
    _, sd_folder, model = small_vpd
    checkpoint = tmp_path / f"{layout}.pth"
    if layout == "vpd":  # VPD's release: its own names and args, no CLIP
        save_checkpoint({"model": _vpd_layout_state(model), "args": {"token_length": TOKEN_LENGTH,
                                                                     "img_size": 32}}, str(checkpoint))
        left_out = "text_encoder"
    else:  # ours, from a machine whose weights path is not recorded
        save_checkpoint({"model": model.checkpoint_state_dict(),
                         "config": model.config.replace(sd_path=None).to_dict()}, str(checkpoint))
        left_out = "backbone.vae, text_encoder"
    stored = load_checkpoint(str(checkpoint))["model"]
    assert not any(key.startswith("text_encoder.") for key in stored)
    assert any(key.startswith("encoder_vq.") for key in stored) == (layout == "vpd")  # VPD saved its VAE
    monkeypatch.chdir(tmp_path)
    for name, load in every_entry_point(checkpoint, tmp_path, toy_root).items():
        with pytest.raises(InputError) as error:
            load()
        exported = name == "tools/export_model.py"
        assert str(error.value) == missing_message(
            checkpoint, "vpd_small", "backbone.vae, text_encoder" if exported else left_out, tmp_path, exported)

    loaded = {name: load() for name, load in every_entry_point(checkpoint, tmp_path, toy_root, sd_folder).items()}
    assert loaded["test.py"] == 0 and loaded["demo.py"] == 0 and loaded["tools/export_model.py"] == 0
    assert loaded["app.py"].segmenter.config.preset == "vpd_small"
    assert json.loads((tmp_path / "results.json").read_text())["results"]["val"]["sentences"] > 0
    expected = logits_of(model)
    assert torch.equal(logits_of(loaded["VPDSegmenter.from_pretrained"]), expected)
    exported = VPDSegmenter.from_pretrained(tmp_path / "exported")  # its config records sd_path
    assert exported.config.sd_path == str(sd_folder) and torch.equal(logits_of(exported), expected)


def test_a_recorded_weights_path_that_is_gone_is_named(small_vpd, tmp_path):
    _, sd_folder, model = small_vpd
    model.save_pretrained(tmp_path / "folder")  # records sd_folder
    shutil.rmtree(sd_folder)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'folder'}: sd_path {sd_folder} does not exist; "
                                         r"expected .* \(the path it records\); pass --sd_path"):
        VPDSegmenter.from_pretrained(tmp_path / "folder")


def test_training_without_weights_names_the_default_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as error:
        build_model(SegmenterConfig(preset="vpd", token_length=40))
    assert str(error.value) == (f"the vpd model is built from Stable Diffusion v1.5 weights: pass --sd_path "
                                f"(sd_path= in Python); the default ./stable-diffusion-v1-5 does not exist in "
                                f"{tmp_path}; expected {ACCEPTED_SD_LAYOUTS}")


# ----------------------------------------------------------------------------------- the sources
def tiny_model():
    return perturb(build_model(SegmenterConfig(preset="tiny", token_length=TOKEN_LENGTH, img_size=32)))


def test_a_hugging_face_cache_folder_and_sharded_weights_load(tmp_path):
    model = tiny_model()
    snapshot = tmp_path / "models--lab--vpd-tiny" / "snapshots" / "0123abcd"
    model.save_pretrained(snapshot)
    (tmp_path / "models--lab--vpd-tiny" / "refs").mkdir()
    (tmp_path / "models--lab--vpd-tiny" / "refs" / "main").write_text("0123abcd")
    expected = logits_of(model)
    assert torch.equal(logits_of(VPDSegmenter.from_pretrained(tmp_path / "models--lab--vpd-tiny")), expected)
    # Sharded as transformers writes large models: an index naming each tensor's file.
    from safetensors.torch import load_file, save_file
    weights = load_file(snapshot / "model.safetensors")
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({key: weights[key] for key in part}, snapshot / name)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {key: name for name, part in shards.items() for key in part}}))
    assert torch.equal(logits_of(VPDSegmenter.from_pretrained(snapshot)), expected)


@pytest.mark.parametrize("kind", ["folder", "checkpoint"])
def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path, kind):
    model = tiny_model()
    with torch.no_grad():
        model.decoder.classifier.weight[0, 0] = float("nan")
        model.text_adapter.gamma[3] = float("inf")
    if kind == "folder":
        model.save_pretrained(tmp_path / "model")
        path = tmp_path / "model"
    else:
        path = tmp_path / "model.pth"
        save_checkpoint({"model": model.checkpoint_state_dict(), "config": model.config.to_dict()}, str(path))
    with pytest.raises(CheckpointError) as error:
        VPDSegmenter.from_pretrained(path)
    assert str(error.value) == (f"{path} holds NaN or infinite values in 2 tensor(s) (decoder.classifier.weight, "
                                f"text_adapter.gamma); a model with them gives meaningless masks, so it is not loaded")


def test_a_checkpoint_missing_trained_tensors_is_refused(tmp_path):
    model = tiny_model()
    state = {k: v for k, v in model.checkpoint_state_dict().items() if not k.startswith("decoder.classifier.")}
    save_checkpoint({"model": state, "config": model.config.to_dict()}, str(tmp_path / "part.pth"))
    with pytest.raises(CheckpointError, match=r"lacks 2 trained tensor\(s\) of the tiny model \(e.g. "
                                              r"decoder.classifier.bias, decoder.classifier.weight\); they would stay random"):
        VPDSegmenter.from_pretrained(tmp_path / "part.pth")


# --------------------------------------------------------------------------------- facts, one home
def test_no_preset_name_decides_anything_outside_its_record():
    """No comparison with a preset's name (`== "vpd"`, `in ("tiny", ...)`) outside models/presets/."""
    names = set(PRESETS)
    offenders = []
    for folder in ("models", "engine", "data", "refer", "utils", "bench", "tools", "."):
        root = os.path.join(REPO_ROOT, folder)
        paths = ([os.path.join(root, n) for n in os.listdir(root) if n.endswith(".py")] if folder == "."
                 else [os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns if n.endswith(".py")])
        for path in paths:
            if os.path.join("models", "presets") in path:
                continue
            with open(path) as handle:
                tree = ast.parse(handle.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Compare):
                    constants = [c for c in [node.left, *node.comparators] for c in
                                 ([c] if not isinstance(c, (ast.Tuple, ast.List, ast.Set)) else c.elts)]
                    if any(isinstance(c, ast.Constant) and c.value in names for c in constants):
                        offenders.append(f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_readme_shows_the_presets_published_numbers_and_how_to_add_one():
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    for dataset, numbers in get_preset("vpd").published.items():
        row = re.search(rf"^\| {re.escape(dataset)} \|(.*)\|$", readme, re.M)
        cells = [cell.strip().strip("*") for cell in row[1].split("|")]
        assert cells == [f"{numbers[metric]:.2f}" for metric in
                         ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU")], dataset
    # The "Adding a model" example runs as written: it registers a preset the programs then offer.
    section = readme.split("## Adding a model", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    before = set(PRESETS)
    try:
        exec(compile(code, "README.md", "exec"), {})
        added = [name for name in PRESETS if name not in before]
        assert len(added) == 1
        model = build_model_on_meta(added[0], token_length=40)
        assert model.config.pad_token_id == 0 and model.backbone.unet.config.use_linear_projection
        assert added[0] in parse_args("train", ["--model", added[0], "--dataset", "refcoco"]).model
    finally:
        for name in [name for name in PRESETS if name not in before]:
            PRESETS.pop(name)


def test_the_end_of_text_id_has_one_home():
    from models.text_encoder import CLIP_END_OF_TEXT_ID
    tokenizer = CLIPTokenizer(8)
    assert tokenizer.eot_id == CLIP_END_OF_TEXT_ID == get_preset("vpd").pad_token_id
    assert CLIPTextConfig().eos_token_id == CLIP_END_OF_TEXT_ID


def test_sd_path_help_says_the_working_directory():
    help_text = " ".join(get_parser("train").format_help().split())
    assert "relative to the working directory, vpd: ./stable-diffusion-v1-5" in help_text
    readme = " ".join(open(os.path.join(REPO_ROOT, "README.md")).read().split())
    assert "./stable-diffusion-v1-5` in the working directory" in readme


def test_registration_is_checked():
    with pytest.raises(ValueError, match="a preset named 'vpd' is registered already"):
        register_preset(get_preset("vpd"))
    with pytest.raises(TypeError, match="register_preset takes a Preset"):
        register_preset({"name": "x"})
    assert register_preset(get_preset("vpd"), replace=True) is get_preset("vpd")


@pytest.mark.parametrize("field,value,message", [
    ("img_size", 100000, r"img_size must be an integer in \[16, 2048\], got 100000"),
    ("decoder_hidden", 1e6, r"decoder_hidden must be an integer in \[1, 4096\], got 1000000.0"),
    ("token_length", 78, r"token_length must be an integer in \[2, 77\] for the tiny model"),
    ("pad_token_id", -1, r"pad_token_id must be an integer in \[0, 1000000\], got -1"),
    ("sd_path", 3, "sd_path must be a path or null, got 3"),
])
def test_config_json_values_out_of_range_are_one_line_errors(tmp_path, field, value, message):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config[field] = value
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=message) as error:
        VPDSegmenter.from_pretrained(tmp_path / "model")
    assert "\n" not in str(error.value) and str(error.value).startswith(str(tmp_path / "model"))


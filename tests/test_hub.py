"""Model folders as Hugging Face Hub repositories: a card in every folder, Hub repository ids
resolved through the Hub cache (offline once cached), push_to_hub uploading the folder."""
import os
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

from models import SegmenterConfig, VPDSegmenter, create_segmenter
from models.card import model_card, training_record
from models.pretrained import ModelNotFoundError, is_hub_repo_id
from tests.programs import run
from tests.test_weights import _perturbed_tiny
from utils.errors import one_line

TOKEN_LENGTH = 10
REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(home, repo_id, folder):
    """`folder` as the Hub cache under HF_HOME `home` holds a downloaded repository:
    hub/models--OWNER--NAME/{refs/main, snapshots/REVISION/...}."""
    storage = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, storage / "snapshots" / REVISION)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(REVISION)
    return storage


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    model = _perturbed_tiny(TOKEN_LENGTH, img_size=64)
    folder = tmp_path_factory.mktemp("hub") / "tiny"
    model.save_pretrained(folder, repo_id="owner/tiny-toy")
    return model, folder


def test_a_cached_repository_loads_offline_and_an_uncached_one_fails_in_one_line(model_folder, tmp_path,
                                                                                 monkeypatch):
    model, folder = model_folder
    hub_cache(tmp_path, "owner/tiny-toy", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = VPDSegmenter.from_pretrained("owner/tiny-toy")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ModelNotFoundError) as error:
        VPDSegmenter.from_pretrained("owner/not-cached")
    assert one_line(error.value) == str(error.value) == (
        f"owner/not-cached: not a local path and not loadable from the Hugging Face Hub: it is not in the "
        f"Hugging Face cache ({tmp_path / 'hub'}) and HF_HUB_OFFLINE is set; download it first (`hf download "
        f"owner/not-cached`) or unset HF_HUB_OFFLINE")
    assert not is_hub_repo_id("checkpoints/model_best.pth") and not is_hub_repo_id(str(folder))
    assert is_hub_repo_id("owner/tiny-toy")


def test_a_program_reads_a_repository_id_with_hf_hub_offline(model_folder, tmp_path):
    """demo.py --checkpoint OWNER/NAME with HF_HOME and HF_HUB_OFFLINE=1, as a user runs it (an
    uncached one: the test above)."""
    _, folder = model_folder
    hub_cache(tmp_path / "home", "owner/tiny-toy", folder)
    image = os.path.join(os.path.dirname(__file__), "..", "docs", "examples", "toy_000701.jpg")
    env = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    result = run(["python", "demo.py", "--checkpoint", "owner/tiny-toy", "--image", image, "--text", "the red square",
                  "--out", str(tmp_path / "overlay.png")], **env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_save_pretrained_writes_a_card_and_push_to_hub_uploads_the_folder(model_folder, monkeypatch):
    _, folder = model_folder
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "vpd-ris" and card.data.pipeline_tag == "image-segmentation"
    assert 'from_pretrained("owner/tiny-toy")' in card.text and "Not recorded" in card.text

    uploaded = {}

    class FakeApi:  # what ModelHubMixin.push_to_hub calls; no network
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update(repo=repo_id, files=sorted(os.listdir(folder_path)),
                            card=(folder_path / "README.md").read_text())
            return "commit-url"

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    model = create_segmenter("tiny", token_length=TOKEN_LENGTH, img_size=64)
    assert model.push_to_hub("someone/pushed") == "commit-url"
    assert uploaded["repo"] == "someone/pushed"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert 'from_pretrained("someone/pushed")' in uploaded["card"]


def test_a_vpd_card_names_stable_diffusion_its_license_and_the_sd_path_it_needs():
    checkpoint = {"args": {"dataset": "refcoco", "splitBy": "unc", "split": "val", "precision": "fp32", "seed": 0},
                  "schedule": {"epochs": 40, "batch_size": 4, "processes": 8, "lr": 5e-05, "wd": 0.01},
                  "epoch": 40, "best": {"score": 73.46, "epoch": 30, "metric": "oIoU",
                                        "val": {"refcoco": {"oIoU": 73.46, "mIoU": 75.67, "P@0.5": 85.52,
                                                            "refs": 3811, "seconds": 95.0}}}}
    card = model_card(SegmenterConfig(preset="vpd", token_length=40), "me/vpd-refcoco", training_record(checkpoint))
    card = ModelCard(str(card))  # as read back from README.md
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.license == "creativeml-openrail-m" and "its use-based restrictions apply" in card.text
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"oIoU": 73.46, "mIoU": 75.67,
                                                                              "P@0.5": 85.52}
    assert "Data: `refcoco` (unc), train split; validated on its val split after every epoch." in card.text
    assert ("Recipe: epochs 40, images per process 4, processes 8, AdamW learning rate 5e-05, weight decay "
            "0.01, precision fp32, seed 0.") in card.text
    assert "These weights are the best epoch's: epoch 31 (oIoU 73.46)." in card.text
    assert "| refcoco | 85.52 | 73.46 | 75.67 |" in card.text
    assert 'from_pretrained("me/vpd-refcoco", sd_path="./stable-diffusion-v1-5")' in card.text

"""The loss is part of the model's config: a `loss` section (class weights and the weight of each
term) built by the model, recorded in checkpoints and model folders, read back from older files as
VPD's loss (plus the toy's recorded Dice weight), and a new term is one registered function."""
import json

import pytest
import torch
import torch.nn.functional as F

from engine.args import parse_args
from models import (LOSS_TERMS, LossConfig, SegmentationLoss, SegmenterConfig, create_segmenter,
                    load_pretrained, register_loss_term)
from models.config import ConfigError
from models.pretrained import config_from_checkpoint
from tests.programs import main_here, train_command
from utils.checkpoint import load_checkpoint
from utils.errors import InputError

FOCAL_CALLS = []


def focal(logits, masks, class_weights):
    """Focal loss (Lin et al., 2017) with gamma 2: a term defined here, not in models/."""
    FOCAL_CALLS.append(logits.shape[0])
    log_p = F.log_softmax(logits, dim=1).gather(1, masks.long()[:, None])[:, 0]
    return (-(1 - log_p.exp()) ** 2 * log_p).mean()


@pytest.fixture
def focal_term():
    register_loss_term("focal", focal)
    FOCAL_CALLS.clear()
    yield
    LOSS_TERMS.pop("focal")


def test_the_loss_section_is_the_model_config_and_checked():
    config = SegmenterConfig(preset="tiny", loss={"terms": {"cross_entropy": 1, "dice": 0.5, "x": 0}})
    assert config.to_dict()["loss"] == {"class_weights": [0.9, 1.1],
                                        "terms": {"cross_entropy": 1.0, "dice": 0.5}}  # 0: left out
    assert SegmenterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert SegmenterConfig().loss == LossConfig.with_terms() == LossConfig(terms={"cross_entropy": 1})
    for bad, message in [({"class_weights": [1.0]}, "two non-negative numbers"),
                         ({"terms": {"dice": -1}}, "non-negative numbers"),
                         ({"terms": {"dice": 1}, "gamma": 2}, "does not know: gamma")]:
        with pytest.raises(ConfigError, match=message):
            SegmenterConfig(loss=bad)
    with pytest.raises(ConfigError, match="unknown loss term.*nothing; known: cross_entropy, dice"):
        SegmentationLoss(LossConfig(terms={"nothing": 1}))(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4))


def test_model_folders_and_checkpoints_record_the_loss_and_older_ones_read_as_vpds(tmp_path):
    model = create_segmenter("tiny", token_length=8, img_size=32, loss=LossConfig.with_terms(dice=1.0))
    model.save_pretrained(tmp_path / "folder")
    saved = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert saved["loss"]["terms"] == {"cross_entropy": 1.0, "dice": 1.0}
    assert load_pretrained(tmp_path / "folder").config.loss == model.config.loss
    # A model folder written before configs had a loss section: VPD's loss.
    del saved["loss"]
    (tmp_path / "folder" / "config.json").write_text(json.dumps(saved))
    assert load_pretrained(tmp_path / "folder").config.loss == LossConfig()
    # A checkpoint of ours without it: VPD's loss plus the Dice weight its run recorded.
    old = {key: value for key, value in model.config.to_dict().items() if key != "loss"}
    assert config_from_checkpoint({"config": old, "schedule": {"dice_weight": 1.0}}).loss == \
        LossConfig.with_terms(dice=1.0)  # the toy's
    assert config_from_checkpoint({"config": old, "args": {"dice_weight": 0.0}}).loss == LossConfig()
    assert config_from_checkpoint({"config": old}).loss == LossConfig()  # VPD's
    assert LossConfig().terms == (("cross_entropy", 1.0),) and LossConfig().class_weights == (0.9, 1.1)


def test_loss_weight_flags_name_registered_terms(focal_term, capsys):
    args = parse_args("train", ["--dataset", "toy", "--loss_weight", "focal=0.5"])
    assert args.loss_weight == [("focal", 0.5)]
    for flag, message in [("focal", "expected TERM=WEIGHT"), ("dice=1", "is --dice_weight"),
                          ("boundary=1", "unknown loss term 'boundary'; known: cross_entropy, dice, focal")]:
        with pytest.raises(SystemExit):
            parse_args("train", ["--loss_weight", flag])
        assert message in capsys.readouterr().err


def test_a_loss_term_added_through_the_config_alone_trains(focal_term, toy_root, tmp_path,
                                                           restore_signal_handlers):
    """A focal term defined in this file: registered, named by --loss_weight, it is built by the
    model, trains, is recorded in the checkpoint, and a resume with another loss is refused."""
    logits, masks = torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 8, 8))
    loss = SegmentationLoss(LossConfig(terms={"cross_entropy": 1, "focal": 0.5}))
    torch.testing.assert_close(loss(logits, masks), F.cross_entropy(logits, masks, weight=torch.tensor(
        [0.9, 1.1])) + 0.5 * focal(logits, masks, None))
    command = train_command(toy_root, tmp_path, 1, "--loss_weight", "focal=0.5")[2:]
    FOCAL_CALLS.clear()
    assert main_here("train.py", command) == 0
    assert FOCAL_CALLS and all(size == 4 for size in FOCAL_CALLS)  # every training batch of 4
    state = load_checkpoint(str(tmp_path / "checkpoint_last_toy.pth"))
    assert state["config"]["loss"] == {"class_weights": [0.9, 1.1],
                                       "terms": {"cross_entropy": 1.0, "dice": 1.0, "focal": 0.5}}
    with pytest.raises(InputError, match=r"holds another model than this run's flags describe \(loss: "
                                         r"checkpoint .*'focal': 0.5.*this run.*the loss comes from "
                                         r"--dice_weight and --loss_weight TERM=W"):
        main_here("train.py", train_command(toy_root, tmp_path, 2)[2:])


def test_the_readmes_loss_term_runs_as_written():
    import os
    import re

    from utils.paths import REPO_ROOT

    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    section = readme.split("## Changing the loss", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    try:
        exec(compile(code, "README.md", "exec"), {})
        logits, masks = torch.randn(3, 2, 6, 6), torch.randint(0, 2, (3, 6, 6))
        p = logits.softmax(dim=1).gather(1, masks[:, None])[:, 0]
        expected = (-(1 - p) ** 2 * p.log()).mean()
        torch.testing.assert_close(SegmentationLoss(LossConfig(terms={"focal": 1}))(logits, masks), expected)
        assert "--loss_weight focal=0.5" in section
        assert parse_args("train", ["--dataset", "toy", "--loss_weight", "focal=0.5"]).loss_weight == [("focal", 0.5)]
    finally:
        LOSS_TERMS.pop("focal", None)

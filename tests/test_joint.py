"""Joint training on datasets that share images, without test leakage (data/joint.py, train.py)."""
import pytest

from data.joint import JointReferDataset
from data.loaders import build_train_set
from models import SegmenterConfig
from refer.synthetic import make_refer_dataset
from tests.programs import load_program
from utils.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def shared_images(tmp_path_factory):
    """RefCOCO images 0-7 (train, val, testA, testB round robin) and RefCOCOg images 4-11 (train,
    val, test): images 4-7 are in both, in other splits."""
    root = str(tmp_path_factory.mktemp("joint"))
    common = dict(num_images=8, special_images=False, image_size=(48, 40))
    refcoco = make_refer_dataset(root, "refcoco", "unc", seed=1, **common)
    refcocog = make_refer_dataset(root, "refcocog", "umd", seed=2, first_image=4, **common)
    return root, refcoco, refcocog


def held_out_images(info):
    return {ref["image_id"] for ref in info.refs.values() if ref["split"] != "train"}


def test_train_refs_of_held_out_images_are_removed_exactly(shared_images):
    root, refcoco, refcocog = shared_images
    held_out = held_out_images(refcoco) | held_out_images(refcocog)
    expected = {name: [r for r in info.ref_ids_by_split["train"] if info.refs[r]["image_id"] in held_out]
                for name, info in (("refcoco", refcoco), ("refcocog", refcocog))}
    assert expected["refcocog"] and not expected["refcoco"]  # the fixture overlaps as intended
    config = SegmenterConfig(preset="tiny", img_size=32, token_length=12)
    dataset, summary = build_train_set(root, [("refcoco", "unc"), ("refcocog", "umd")], config)
    assert isinstance(dataset, JointReferDataset)
    coco_part, gref_part = dataset.members
    assert sorted(gref_part.excluded_ref_ids) == sorted(expected["refcocog"])
    assert coco_part.excluded_ref_ids == []
    kept = {(part.dataset, ref["ref_id"]) for part in dataset.members for ref in part.refs}
    assert all(ref["image_id"] not in held_out for part in dataset.members for ref in part.refs)
    assert len(dataset) == len(kept) == len(refcoco.ref_ids_by_split["train"]) + \
        len(refcocog.ref_ids_by_split["train"]) - len(expected["refcocog"])
    assert summary.startswith(f"joint training on refcoco(unc), refcocog(umd): left out "
                              f"{len(expected['refcocog'])} train refs (refcoco(unc) 0, refcocog(umd) "
                              f"{len(expected['refcocog'])})")
    # Shared images are listed once for the latent cache.
    keys = [key for key, _ in dataset.unique_images()]
    assert len(keys) == len(set(keys))


def test_joint_training_validates_on_each_dataset(shared_images, tmp_path, capsys,
                                                  restore_signal_handlers):
    root, _, _ = shared_images
    train = load_program("train.py")
    argv = ["--dataset", "refcoco,refcocog", "--refer_data_root", root, "--model", "tiny",
            "--img_size", "32", "--batch-size", "2", "--epochs", "1", "--workers", "0",
            "--output-dir", str(tmp_path)]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "joint training on refcoco(unc), refcocog(umd): left out" in out
    assert "| val oIoU refcoco " in out and ", refcocog " in out and ", mean " in out
    state = load_checkpoint(str(tmp_path / "checkpoint_last_refcoco_refcocog.pth"))
    assert state["best"]["metric"] == "mean oIoU" and state["config"]["token_length"] == 77

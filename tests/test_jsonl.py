"""Your own data as JSON lines (refer/jsonl.py), the dataset catalog (refer/catalog.py) and the
dataset interface (data/interface.py): a REFER dataset converted by tools/refer_to_jsonl.py reads,
trains and scores alike through both formats; every bad line is named with its file and line; the
README's example runs as written."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data.interface import RefIndex, ReferringDataset
from data.loaders import build_train_set
from data.refer_dataset import EmptyMaskError, ReferDataset
from engine.args import parse_args
from models import SegmenterConfig
from refer import REFER, get_dataset
from refer.catalog import (CatalogError, DatasetRecord, register_dataset, register_jsonl,
                           unregister_dataset)
from refer.check import check_data
from refer.check import main as check_main
from refer.jsonl import JsonlError, JsonlRefs
from refer.synthetic import make_refer_dataset
from tests.programs import environment, main_here, run, train_command
from tools.refer_to_jsonl import convert
from utils.paths import REPO_ROOT

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Synthetic RefCOCO (every kind of segmentation, grayscale / CMYK / RGBA / palette images)
    and its conversions with RLE targets and with PNG masks."""
    root = tmp_path_factory.mktemp("formats")
    make_refer_dataset(str(root / "refer"), "refcoco", "unc", num_images=8)
    make_refer_dataset(str(root / "refer"), "grefcoco", "unc", num_images=8, special_images=False)
    folders = {masks: str(root / masks) for masks in ("rle", "png")}
    for masks, folder in folders.items():
        convert(str(root / "refer"), "refcoco", "unc", folder, masks=masks)
    folders["gres"] = str(root / "gres")
    convert(str(root / "refer"), "grefcoco", "unc", folders["gres"])
    return str(root / "refer"), folders


def items_of(dataset):
    dataset.set_sentence_seed(3)
    return [dataset[index] for index in range(len(dataset))]


@pytest.mark.parametrize("dataset,form", [("refcoco", "rle"), ("refcoco", "png"), ("grefcoco", "gres")])
@pytest.mark.parametrize("eval_mode", [False, True])
def test_a_converted_dataset_gives_the_same_items(converted, dataset, form, eval_mode):
    root, folders = converted
    for split in ("train", "val", "testA", "testB"):
        sizes = dict(img_size=32, token_length=16, eval_mode=eval_mode)
        refer = ReferDataset(root, dataset, "unc", split, **sizes)
        jsonl = ReferDataset(None, f"jsonl:{folders[form]}", "jsonl", split, **sizes)
        assert len(refer) == len(jsonl) > 0 and refer.generalized == jsonl.generalized
        for ours, theirs in zip(items_of(refer), items_of(jsonl)):
            assert theirs["ref_id"] == str(ours["ref_id"])  # the converter's id
            for key in ("image", "mask", "input_ids", "attention_mask"):
                assert torch.equal(ours[key], theirs[key]), (split, key)
            assert ours.get("sentences") == theirs.get("sentences")
            assert ours["no_target"] == theirs["no_target"]
        assert refer.unique_images()[0][1] == jsonl.unique_images()[0][1]  # the same files
    assert any(refer.no_target) == (dataset == "grefcoco")


def test_both_readers_and_the_dataset_have_the_written_interface(converted):
    root, folders = converted
    assert isinstance(REFER(root, "refcoco", "unc"), RefIndex)
    assert isinstance(JsonlRefs(folders["rle"]), RefIndex)
    dataset = ReferDataset(None, f"jsonl:{folders['png']}", "jsonl", "val", img_size=32)
    assert isinstance(dataset, ReferringDataset)
    item = dataset[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert item["mask"].dtype == torch.int64 and item["input_ids"].dtype == torch.int64


@pytest.fixture(scope="module")
def toy_checkpoint(toy_root, tmp_path_factory):
    """A tiny model trained one epoch on the small toy: masks that depend on image and text."""
    output = tmp_path_factory.mktemp("jsonl_checkpoint")
    assert main_here("train.py", train_command(toy_root, output, 1, "--no_tensorboard")[2:]) == 0
    return str(output / "model_best_toy.pth")


def results(path):
    table = json.loads(open(path).read())["results"]
    for split in table.values():
        del split["seconds"]
    return table


def test_one_checkpoint_scores_both_formats_alike(converted, toy_checkpoint, tmp_path, capsys):
    """test.py on the REFER files and on their conversion with PNG masks, test.sh on two processes
    on the conversion with RLE targets: every metric of every split and every saved mask the same
    (two processes sum in another order: the same table as printed); the text-blind control
    (--swap_text) with cached latents too."""
    root, folders = converted
    common = ["--checkpoint", toy_checkpoint, "--split", "all", "--workers", "0"]
    out = {name: tmp_path / name for name in ("refer", "rle", "png")}
    assert main_here("test.py", ["--dataset", "refcoco", "--refer_data_root", root, *common,
                                 "--results_json", str(out["refer"] / "r.json"),
                                 "--save_masks", str(out["refer"] / "masks")]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    result = run(["bash", "test.sh", f"jsonl:{folders['rle']}", toy_checkpoint, "--split", "all",
                  "--workers", "0", "--results_json", str(out["rle"] / "r.json"),
                  "--save_masks", str(out["rle"] / "masks")], NPROC="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert main_here("test.py", ["--dataset", f"jsonl:{folders['png']}", *common,
                                 "--results_json", str(out["png"] / "r.json"),
                                 "--save_masks", str(out["png"] / "masks"),
                                 "--vis_dir", str(out["png"] / "panels"), "--vis_num", "3"]) == 0
    table = results(out["refer"] / "r.json")
    assert list(table) == ["val", "testA", "testB"] and 0 < table["val"]["oIoU"] < 100
    assert results(out["png"] / "r.json") == table
    two_processes = results(out["rle"] / "r.json")
    assert two_processes.keys() == table.keys()
    assert all(two_processes[split] == pytest.approx(table[split], rel=1e-12) for split in table)
    assert [line for line in result.stdout.splitlines() if line.startswith("|")] == printed
    refer = REFER(root, "refcoco", "unc")
    names = [(f"{ref['ref_id']}_{sentence['sent_id']}.png", f"{ref['ref_id']}_{k}.png")
             for ref in refer.Refs.values() if ref["split"] != "train"
             for k, sentence in enumerate(ref["sentences"])]
    fractions = set()
    for refer_name, jsonl_name in names:
        saved = (out["refer"] / "masks" / refer_name).read_bytes()
        assert (out["rle"] / "masks" / jsonl_name).read_bytes() == saved
        assert (out["png"] / "masks" / jsonl_name).read_bytes() == saved
        fractions.add(float((np.asarray(Image.open(out["refer"] / "masks" / refer_name)) > 0).mean()))
    assert len(names) == len(os.listdir(out["rle"] / "masks")) and len(fractions) > 3
    assert len(os.listdir(out["png"] / "panels")) == 3
    # --swap_text with --cache_latents, through both formats.
    swapped = {}
    for name, dataset in (("refer", "refcoco"), ("rle", f"jsonl:{folders['rle']}")):
        assert main_here("test.py", ["--dataset", dataset, "--refer_data_root", root, *common,
                                     "--swap_text", "--cache_latents", str(tmp_path / f"cache_{name}"),
                                     "--results_json", str(tmp_path / f"swap_{name}.json")]) == 0
        swapped[name] = results(tmp_path / f"swap_{name}.json")
    assert swapped["refer"] == swapped["rle"] != table
    # A generalized dataset (no_target lines): the GRES table, the same through both formats.
    gres = {}
    for name, dataset in (("refer", "grefcoco"), ("jsonl", f"jsonl:{folders['gres']}")):
        assert main_here("test.py", ["--dataset", dataset, "--refer_data_root", root, *common,
                                     "--results_json", str(tmp_path / f"gres_{name}.json")]) == 0
        gres[name] = results(tmp_path / f"gres_{name}.json")
    assert gres["refer"] == gres["jsonl"] and "gIoU" in gres["refer"]["val"]


# ------------------------------------------------------------------------------ bad input
def _image(path, size, mode="RGB", value=200):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value).save(path)


def _mask(path, size, box):
    pixels = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


GOOD = {"image": "images/a.jpg", "mask": "masks/a.png", "sentences": ["the cup"]}
# (line, the problem as named after "FILE:LINE: ")
BAD_LINES = {
    "not JSON": ('{"image": "images/a.jpg", "sentences": ["the cup"]', "not JSON: Expecting ',' delimiter at column 51"),
    "missing image": (dict(GOOD, image="images/nope.jpg"), "image images/nope.jpg not found ("),
    "missing mask": (dict(GOOD, mask="masks/nope.png"), "mask masks/nope.png not found ("),
    "mask size": (dict(GOOD, mask="masks/small.png"),
                  "mask masks/small.png is 10x10 pixels, its image images/a.jpg 64x48"),
    "no sentences": ({"image": "images/a.jpg", "mask": "masks/a.png"},
                     "no 'sentences' (a list of one or more expressions)"),
    "empty sentences": (dict(GOOD, sentences=[]), "'sentences' must be a non-empty list of strings, got []"),
    "empty sentence": (dict(GOOD, sentences=["the cup", "  "]), "sentence 2 is empty"),
    "sentences string": (dict(GOOD, sentences="the cup"), "'sentences' is a string; expected a list"),
    "two targets": (dict(GOOD, polygons=[[1, 1, 20, 1, 20, 20]]),
                    "2 targets given (mask, polygons); give exactly one"),
    "no target": ({"image": "images/a.jpg", "sentences": ["the cup"]}, "no target: give one of mask"),
    "unknown key": (dict(GOOD, caption="a cup"), "unknown key 'caption'; a line has image, sentences"),
    "rle size": ({"image": "images/a.jpg", "rle": {"size": [10, 10], "counts": [100]},
                  "sentences": ["the cup"]}, "rle size [10, 10] is not its image's [height, width] [48, 64]"),
    "short polygon": (dict({k: v for k, v in GOOD.items() if k != "mask"}, polygons=[[1, 1, 20, 1]]),
                      "polygon 1 has 4 numbers; a polygon is at least 3 points"),
    "jpeg mask": (dict(GOOD, mask="masks/a.jpg"), "mask masks/a.jpg is a JPEG; masks must be PNGs"),
    "no_target false": ({"image": "images/a.jpg", "no_target": False, "sentences": ["the dog"]},
                        "'no_target' must be true (got false)"),
    "repeated id": (dict(GOOD, id="cup"), "id 'cup' is already used by train.jsonl line 1"),
}


def write_folder(folder, train_lines, val_lines=(GOOD,)):
    _image(os.path.join(folder, "images", "a.jpg"), (64, 48))
    _mask(os.path.join(folder, "masks", "a.png"), (64, 48), (10, 10, 30, 30))
    _mask(os.path.join(folder, "masks", "small.png"), (10, 10), (1, 1, 5, 5))
    _image(os.path.join(folder, "masks", "a.jpg"), (64, 48), "L", 255)
    for name, lines in (("train", train_lines), ("val", val_lines)):
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as handle:
            handle.write("\n".join(line if isinstance(line, str) else json.dumps(line)
                                   for line in lines) + "\n")
    return folder


@pytest.mark.parametrize("case", BAD_LINES)
def test_a_bad_line_is_named_with_its_file_and_line(tmp_path, case):
    line, problem = BAD_LINES[case]
    folder = write_folder(str(tmp_path), [dict(GOOD, id="cup"), line])
    with pytest.raises(JsonlError) as error:
        JsonlRefs(folder)
    message = str(error.value)
    assert message.startswith(f"{folder}/train.jsonl:2: {problem}") and "\n" not in message


def test_the_checker_lists_every_problem_and_training_stops_at_the_first(tmp_path, capsys):
    folder = write_folder(str(tmp_path / "data"), [dict(GOOD, id="cup")] + [line for line, _ in BAD_LINES.values()])
    assert check_main(["--dataset", f"jsonl:{folder}"]) == 1
    out = capsys.readouterr().out
    for number, (_, problem) in enumerate(BAD_LINES.values(), start=2):
        assert f"error: {folder}/train.jsonl:{number}: {problem}" in out
    assert f"| jsonl:{folder} | jsonl | train | 1 | 1 | - | 1 | 0 | 0 | 0 | 0 | error |" in out
    assert f"| jsonl:{folder} | jsonl | val | 1 | 1 | - | 1 | 0 | 0 | 0 | 0 | ok |" in out
    # train.py: the first problem, before anything is trained or saved (run_cli prints it as one
    # line with exit status 2).
    with pytest.raises(JsonlError) as error:
        main_here("train.py", ["--dataset", f"jsonl:{folder}", "--model", "tiny", "--output-dir",
                               str(tmp_path / "ckpt"), "--workers", "0"])
    assert str(error.value) == (f"{folder}/train.jsonl:2: {BAD_LINES['not JSON'][1]} (python -m "
                                f"refer.check --dataset jsonl:{folder} lists every problem)")
    assert not [name for name in os.listdir(tmp_path / "ckpt") if name.endswith(".pth")]


def test_a_mask_that_cannot_be_decoded_is_named(tmp_path, capsys):
    """Its header reads (the line passes), its pixels do not: named when the masks are read."""
    folder = write_folder(str(tmp_path), [GOOD, dict(GOOD, mask="masks/cut.png")])
    with open(os.path.join(folder, "masks", "a.png"), "rb") as handle:
        head = handle.read(60)
    with open(os.path.join(folder, "masks", "cut.png"), "wb") as handle:
        handle.write(head)
    expected = f"{folder}/train.jsonl:2: mask masks/cut.png cannot be decoded ("
    with pytest.raises(JsonlError) as error:
        ReferDataset(None, f"jsonl:{folder}", "jsonl", "train", img_size=16, token_length=8)
    assert str(error.value).startswith(expected)
    assert check_main(["--dataset", f"jsonl:{folder}"]) == 1
    assert f"error: {expected}" in capsys.readouterr().out


def test_a_folder_without_files_and_a_train_split_of_no_target(tmp_path):
    with pytest.raises(CatalogError, match="no folder"):
        get_dataset(f"jsonl:{tmp_path / 'nowhere'}")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CatalogError, match="holds no .jsonl file; expected train.jsonl, val.jsonl"):
        get_dataset(f"jsonl:{tmp_path / 'empty'}")
    nothing = {"image": "images/a.jpg", "no_target": True, "sentences": ["the dog"]}
    folder = write_folder(str(tmp_path / "none"), [nothing], [GOOD, nothing])
    record = get_dataset(f"jsonl:{folder}")
    assert record.generalized and record.evaluator == "gres" and record.short_name == "none"
    with pytest.raises(EmptyMaskError, match="refers to nothing"):
        ReferDataset(None, record.name, "jsonl", "train", img_size=16, token_length=8)
    val = ReferDataset(None, record.name, "jsonl", "val", img_size=16, token_length=8, eval_mode=True)
    assert val.generalized and val.no_target == [False, True]


# ------------------------------------------------------------------------------ the catalog
def test_a_registered_folder_is_a_dataset_name_with_its_recipe(tmp_path, capsys):
    folder = write_folder(str(tmp_path / "shoes"), [GOOD, dict(GOOD, sentences=["a cup"])])
    register_jsonl("shoes", folder, recipe={"token_length": 20, "model": "tiny"})
    try:
        args = parse_args("train", ["--dataset", "shoes"])
        assert (args.datasets, args.token_length, args.model, args.model_id) == \
            ([("shoes", "jsonl")], 20, "tiny", "shoes")
        args = parse_args("train", ["--dataset", f"jsonl:{folder}"])
        assert (args.token_length, args.model, args.model_id) == (77, "vpd", "shoes")
        with pytest.raises(SystemExit):
            parse_args("train", ["--dataset", "shoes", "--split", "test"])
        assert "shoes (jsonl) has no held-out split 'test'; expected one of val" in capsys.readouterr().err
    finally:
        unregister_dataset("shoes")
    with pytest.raises(SystemExit):
        parse_args("train", ["--dataset", "shoes"])
    assert "unknown dataset 'shoes'; expected one of refcoco," in capsys.readouterr().err


def test_a_registered_refer_layout_dataset_is_read_checked_and_trained_like_refcoco(tmp_path):
    """A dataset in the REFER layout under a new name: one record, and every program knows it."""
    info = make_refer_dataset(str(tmp_path), "refcoco", "unc", num_images=4, special_images=False)
    shutil.copytree(tmp_path / "refcoco", tmp_path / "mycoco")
    register_dataset(DatasetRecord("mycoco", image_dir=os.path.relpath(info.image_dir, tmp_path),
                                   partitions={"unc": ("train", "val", "testA", "testB")},
                                   recipe={"token_length": 24}, joint=True,
                                   published_counts={"unc": {"val": (1, None)}}))
    try:
        args = parse_args("train", ["--dataset", "mycoco,refcoco", "--refer_data_root", str(tmp_path)])
        assert args.datasets == [("mycoco", "unc"), ("refcoco", "unc")] and args.token_length == 40
        assert parse_args("test", ["--dataset", "mycoco", "--checkpoint", "c.pth"]).token_length is None
        dataset = ReferDataset(str(tmp_path), "mycoco", "unc", "val", img_size=16, token_length=24)
        assert [ref["ref_id"] for ref in dataset.refs] == info.expected_ref_ids("val")
        result = check_data(str(tmp_path), [("mycoco", "unc")])
        assert result.ok and result.warnings[0].startswith("mycoco(unc) val: 2 refs where 1 were published")
    finally:
        unregister_dataset("mycoco")


def test_joint_training_with_a_jsonl_folder_leaves_out_the_same_refs(tmp_path):
    """RefCOCO with RefCOCOg, and with RefCOCOg converted to JSONL: images are matched by file, so
    the same train refs of held-out images are left out."""
    root = str(tmp_path)
    common = dict(num_images=8, special_images=False, image_size=(48, 40))
    make_refer_dataset(root, "refcoco", "unc", seed=1, **common)
    make_refer_dataset(root, "refcocog", "umd", seed=2, first_image=4, **common)
    convert(root, "refcocog", "umd", str(tmp_path / "gref_jsonl"))
    config = SegmenterConfig(preset="tiny", img_size=32, token_length=12)
    refer_joint, refer_summary = build_train_set(root, [("refcoco", "unc"), ("refcocog", "umd")], config)
    jsonl = f"jsonl:{tmp_path / 'gref_jsonl'}"
    jsonl_joint, jsonl_summary = build_train_set(root, [("refcoco", "unc"), (jsonl, "jsonl")], config)
    assert refer_joint.members[1].excluded_ref_ids  # the fixture overlaps as intended
    assert [str(r) for r in refer_joint.members[1].excluded_ref_ids] == jsonl_joint.members[1].excluded_ref_ids
    assert len(refer_joint) == len(jsonl_joint)
    left_out = f"left out {len(jsonl_joint.members[1].excluded_ref_ids)} train refs"
    assert left_out in refer_summary and left_out in jsonl_summary
    assert refer_summary.split(") of ")[1] == jsonl_summary.split(") of ")[1]
    assert parse_args("train", ["--dataset", f"refcoco,{jsonl}", "--refer_data_root", root]).datasets == \
        [("refcoco", "unc"), (jsonl, "jsonl")]


# ------------------------------------------------------------------------ the README example
def readme_example():
    """The files and commands of README's "Your own data", as written there."""
    text = open(os.path.join(REPO_ROOT, "README.md")).read()
    section = text[text.index("### Your own data"):text.index("## Weights")]
    files = dict(re.findall(r"^`(my_data/\w+\.jsonl)`:\n\n```\n(.*?)```", section, re.S | re.M))
    (commands,) = [block for block in re.findall(r"```\n(.*?)```", section, re.S)
                   if block.startswith("python -m refer.check")]
    return files, commands.strip().splitlines()


def test_the_readme_example_runs_as_written(tmp_path):
    files, commands = readme_example()
    assert set(files) == {"my_data/train.jsonl", "my_data/val.jsonl"} and len(commands) == 3
    # A copy of the repository (the commands write checkpoints/ and logs/ where they run).
    copy = tmp_path / "repo"

    def outputs_and_data(folder, names):
        return [name for name in names if name in (".git", "__pycache__", "checkpoints", "logs")
                or name.endswith(".egg-info") or (name == "data" and os.path.basename(folder) == "refer")]

    shutil.copytree(REPO_ROOT, copy, ignore=outputs_and_data)
    # The pictures the lines name (160 x 120), their masks, then the lines as written.
    for name in ("kitchen", "street"):
        _image(str(copy / "my_data" / "images" / f"{name}.jpg"), (160, 120), value=(90, 140, 200))
    _mask(str(copy / "my_data" / "masks" / "kitchen_cup.png"), (160, 120), (10, 30, 50, 90))
    _mask(str(copy / "my_data" / "masks" / "street_car1.png"), (160, 120), (70, 60, 110, 100))
    _mask(str(copy / "my_data" / "masks" / "street_car2.png"), (160, 120), (115, 60, 155, 100))
    for name, content in files.items():
        (copy / name).write_text(content)
    env = environment(PYTHONPATH=str(copy))
    for command in commands:
        result = subprocess.run(command, shell=True, cwd=copy, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
    assert "| val |" in result.stdout  # test.sh's table
    saved = sorted(os.listdir(copy / "my_masks"))
    assert saved == ["val-1_0.png", "val-2_0.png"]

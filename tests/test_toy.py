"""Tests of the generated toy REFER dataset (refer/toy/)."""

import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from refer.toy import (
    PALETTE,
    SHAPES,
    SPLITS,
    build_gtoy_dataset,
    build_toy_dataset,
    ensure_toy_dataset,
    parse_expression,
    resolve_expression,
)
from refer.refer import REFER
from utils.paths import REPO_ROOT
from utils.process_map import process_map

# pycocotools 2.0.x + numpy 2 warn on every decode; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = dict(num_train_images=24, num_eval_images=8, image_size=96)
# Another interpreter, given the repository as its first argument.
_SUBPROCESS_PRELUDE = "import sys; sys.path.insert(0, sys.argv[1]); from refer import toy;"


def _load(root):
    with open(os.path.join(root, "instances.json")) as f:
        inst = json.load(f)
    with open(os.path.join(root, "refs(unc).p"), "rb") as f:
        refs = pickle.load(f)
    return inst, refs


def _digest(root):
    """sha256 of every file under root, keyed by relative path."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


# The tests on the default dataset share one worker, so that it is generated once.
ON_DEFAULT_TOY = pytest.mark.xdist_group("default_toy")


@pytest.fixture(scope="module")
def default_toy(tmp_path_factory):
    """The dataset with default parameters (what a newcomer gets)."""
    data_root = tmp_path_factory.mktemp("toyroot")
    root = ensure_toy_dataset(str(data_root))
    inst, refs = _load(root)
    return {"data_root": str(data_root), "root": root, "inst": inst, "refs": refs}


# ----------------------------------------------------------------------------- determinism
def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a = ensure_toy_dataset(str(tmp_path / "a"), seed=3, **SMALL)
    b = ensure_toy_dataset(str(tmp_path / "b"), seed=3, **SMALL)
    c = ensure_toy_dataset(str(tmp_path / "c"), seed=4, **SMALL)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    for name in ("instances.json", "refs(unc).p"):
        assert da[name] != dc[name]


def test_deterministic_across_processes(tmp_path):
    """Another interpreter (different hash seed) produces the same annotation bytes."""
    here = ensure_toy_dataset(str(tmp_path / "here"), seed=1, **SMALL)
    code = _SUBPROCESS_PRELUDE + f"toy.ensure_toy_dataset(sys.argv[2], seed=1, **{SMALL!r})"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, REPO_ROOT, str(tmp_path / "there")],
                   check=True, env=env, timeout=60)
    dh, dt = _digest(here), _digest(str(tmp_path / "there" / "toy"))
    assert dh["instances.json"] == dt["instances.json"]
    assert dh["refs(unc).p"] == dt["refs(unc).p"]


def test_the_files_do_not_depend_on_the_number_of_processes_making_them(tmp_path):
    build_toy_dataset(str(tmp_path / "one"), seed=5, processes=1, **SMALL)
    build_toy_dataset(str(tmp_path / "three"), seed=5, processes=3, **SMALL)
    assert _digest(str(tmp_path / "one")) == _digest(str(tmp_path / "three"))


# sha256 of the files of a small seeded toy and gtoy (every file: the sorted "path sha256" lines,
# hashed; and the annotation files alone), as data/toy.py and data/gtoy.py wrote them at commit
# b3983c1, before they became the refer/toy package (Pillow 12.3.0, which encodes the JPEGs):
#   git archive b3983c1 | tar -x -C /tmp/old && cd /tmp/old && python -c "import sys, tempfile;
#   from data.toy import build_toy_dataset as b; d = tempfile.mkdtemp(); b(d, seed=3,
#   num_train_images=6, num_eval_images=4, image_size=64, processes=1); print(d)"
# (data.gtoy.build_gtoy_dataset likewise), then the digest below of the printed folder.
RECORDED = {
    "toy": ("9d5218b79d504ccfc8d63db62352dd5038a606e9a04cab8baf7fd775ea4c1d56",
            {"instances.json": "c413abb778e6c4ea7cf7cc7a48d1f8874c6cd102dc070eec10a2967e9493e132",
             "refs(unc).p": "83dfd5817c9522c4d1672cf42fa91d31aff91f6a6552f87cacfac97a42feda01"}),
    "gtoy": ("10cb763d9e0600ee3b3cc5f3ebd15854488ab8fb7450d3789cf7dc04048b6a74",
             {"instances.json": "6617ca3f555694a29ccb47b8f4a9d30c0790ec05532deb6e0d6bf0e0bdcb0f46",
              "grefs(unc).json": "5c5bc833d282cac1317bfda02044f0aae287d40c2e3531b6d5296994ec7095ca"}),
}


@pytest.mark.parametrize("name,build", [("toy", build_toy_dataset), ("gtoy", build_gtoy_dataset)])
def test_the_generators_write_the_files_of_the_code_they_replace(tmp_path, name, build):
    build(str(tmp_path), seed=3, num_train_images=6, num_eval_images=4, image_size=64, processes=1)
    files = _digest(str(tmp_path))
    total, annotations = RECORDED[name]
    assert {path: files[path] for path in annotations} == annotations
    lines = sorted(f"{path} {digest}" for path, digest in files.items())
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == total


def test_process_map_keeps_the_order_and_names_a_failed_worker():
    values = [(float(v),) for v in range(12)]
    assert process_map(math.sqrt, values, processes=3) == [math.sqrt(v) for v, in values]
    with pytest.raises(RuntimeError, match=r"worker process of math.sqrt ended with status 1: "
                                           r"ValueError: (math domain error|expected a nonnegative)"):
        process_map(math.sqrt, [(1.0,), (-1.0,)], processes=2)


def test_val_split_independent_of_train_size(tmp_path):
    """Each image has its own seed: changing the train size does not change val scenes."""
    a = build_toy_dataset(str(tmp_path / "a"), seed=0, **SMALL)
    b = build_toy_dataset(str(tmp_path / "b"), seed=0, **dict(SMALL, num_train_images=5))
    assert a["images"] > b["images"]
    ia, ra = _load(str(tmp_path / "a"))
    ib, rb = _load(str(tmp_path / "b"))
    sents = lambda refs: [[s["sent"] for s in r["sentences"]] for r in refs if r["split"] == "val"]
    assert sents(ra) == sents(rb)


# ----------------------------------------------------------------------------- caching
def test_ensure_reuses_and_rebuilds_on_param_change(tmp_path):
    root = ensure_toy_dataset(str(tmp_path), seed=0, **SMALL)
    assert root == os.path.join(str(tmp_path), "toy")
    inst_path = os.path.join(root, "instances.json")
    mtime = os.stat(inst_path).st_mtime_ns
    assert ensure_toy_dataset(str(tmp_path), seed=0, **SMALL) == root
    assert os.stat(inst_path).st_mtime_ns == mtime            # reused, not rebuilt

    ensure_toy_dataset(str(tmp_path), seed=0, **dict(SMALL, num_train_images=10))
    inst, _ = _load(root)
    assert inst["info"]["params"]["num_train_images"] == 10   # rebuilt with the new params
    assert sorted(os.listdir(tmp_path)) == ["toy"]             # no temp / stale dirs left


def test_concurrent_builders_leave_one_complete_dataset(tmp_path):
    code = _SUBPROCESS_PRELUDE + f"print(toy.ensure_toy_dataset(sys.argv[2], seed=2, **{SMALL!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code, REPO_ROOT, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert set(outs) == {os.path.join(str(tmp_path), "toy")}
    assert sorted(os.listdir(tmp_path)) == ["toy"]
    assert _digest(outs[0]) == _digest(ensure_toy_dataset(str(tmp_path / "ref"), seed=2, **SMALL))


def test_half_written_dataset_is_replaced(tmp_path):
    broken = tmp_path / "toy"
    (broken / "images").mkdir(parents=True)
    (broken / "instances.json").write_text("{\"images\": [")  # truncated, no refs file
    root = ensure_toy_dataset(str(tmp_path), seed=0, **SMALL)
    inst, refs = _load(root)
    assert inst["images"] and refs
    assert sorted(os.listdir(tmp_path)) == ["toy"]


# ----------------------------------------------------------------------------- structure
@ON_DEFAULT_TOY
def test_valid_refer_structure(default_toy):
    inst, refs, root = default_toy["inst"], default_toy["refs"], default_toy["root"]
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    assert len(images) == len(inst["images"]) and len(anns) == len(inst["annotations"])
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    assert sorted(cats.values()) == sorted(SHAPES)

    for a in inst["annotations"]:
        assert a["image_id"] in images and a["category_id"] in cats and a["iscrowd"] == 0
        poly = a["segmentation"]
        assert isinstance(poly, list) and len(poly) == 1 and len(poly[0]) >= 6
        assert len(poly[0]) % 2 == 0
        x, y, w, h = a["bbox"]
        im = images[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
        assert 0 < a["area"] <= w * h

    anns_per_image = Counter(a["image_id"] for a in inst["annotations"])
    assert set(anns_per_image) == set(images)
    assert min(anns_per_image.values()) >= 2
    assert max(anns_per_image.values()) <= 4

    split_of_image = {}
    ref_ids, sent_ids = set(), set()
    for r in refs:
        assert set(r) >= {"ref_id", "ann_id", "image_id", "split", "sentences", "sent_ids",
                          "file_name", "category_id"}
        assert r["ref_id"] not in ref_ids
        ref_ids.add(r["ref_id"])
        ann = anns[r["ann_id"]]
        assert ann["image_id"] == r["image_id"]
        assert r["category_id"] == ann["category_id"]
        assert r["file_name"] == images[r["image_id"]]["file_name"]
        assert r["split"] in SPLITS
        assert split_of_image.setdefault(r["image_id"], r["split"]) == r["split"]
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
        assert 1 <= len(r["sentences"]) <= 3
        for s in r["sentences"]:
            assert s["sent_id"] not in sent_ids
            sent_ids.add(s["sent_id"])
            assert s["sent"] == s["sent"].lower() == " ".join(s["sent"].split())
            assert s["tokens"] == s["sent"].split()
            assert s["raw"].lower() == s["sent"]
    # every image is in exactly one split and has at least two refs
    assert set(split_of_image) == set(images)
    assert min(Counter(r["image_id"] for r in refs).values()) >= 2
    # every split present; sizes in the intended range
    per_split = Counter(r["split"] for r in refs)
    assert set(per_split) == set(SPLITS)
    assert 5000 <= per_split["train"] <= 6500
    assert 200 <= per_split["val"] <= 450
    # at least one ann per ref and one ref per describable ann
    assert len({r["ann_id"] for r in refs}) == len(refs)

    sizes = set()
    for im in inst["images"]:
        with Image.open(os.path.join(root, "images", im["file_name"])) as f:
            assert f.format == "JPEG" and f.mode == "RGB"
            assert f.size == (im["width"], im["height"])
            sizes.add(f.size)
    assert len(sizes) >= 3                       # several sizes, to exercise resizing


@ON_DEFAULT_TOY
def test_readable_by_repo_refer_api(default_toy):
    refer = REFER(default_toy["data_root"], "toy", "unc")
    for split in SPLITS:
        assert refer.getRefIds(split=split)
    ref = refer.loadRefs(refer.getRefIds(split="val")[:1])[0]
    m = refer.getMask(ref)["mask"]
    img = refer.loadImgs([ref["image_id"]])[0]
    assert m.shape == (img["height"], img["width"]) and m.sum() > 0
    assert os.path.isfile(refer.image_path(img))


# ----------------------------------------------------------------------------- pixels
@ON_DEFAULT_TOY
def test_mask_colour_matches_object_colour(default_toy):
    inst, root = default_toy["inst"], default_toy["root"]
    images = {im["id"]: im for im in inst["images"]}
    names = list(PALETTE)
    pal = np.array([PALETTE[n] for n in names], dtype=np.float64)
    by_image = defaultdict(list)
    for a in inst["annotations"]:
        by_image[a["image_id"]].append(a)
    worst = 0.0
    for image_id, anns in by_image.items():
        im = images[image_id]
        h, w = im["height"], im["width"]
        pix = np.asarray(Image.open(os.path.join(root, "images", im["file_name"])).convert("RGB"),
                         dtype=np.float64)
        bg = np.ones((h, w), bool)
        for a in anns:
            m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w)))
            m = m.astype(bool)
            assert m.sum() > 0.7 * a["area"]
            bg &= ~m
            mean = pix[m].mean(0)
            dist = np.linalg.norm(pal - mean, axis=1)
            assert names[int(dist.argmin())] == a["color"], (image_id, a["id"], mean)
            worst = max(worst, float(dist[names.index(a["color"])]))
        # the background is far from every palette colour
        assert np.linalg.norm(pal - pix[bg].mean(0), axis=1).min() > 80
    assert worst < 45, worst


# ----------------------------------------------------------------------------- expressions
def _scene(inst):
    images = {im["id"]: im for im in inst["images"]}
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    objects = defaultdict(list)
    for a in inst["annotations"]:
        pts = np.array(a["segmentation"][0]).reshape(-1, 2)
        objects[a["image_id"]].append({
            "ann_id": a["id"], "colour": a["color"], "shape": cats[a["category_id"]],
            "area": a["area"], "cx": float(pts[:, 0].mean()), "cy": float(pts[:, 1].mean())})
    return images, objects


@ON_DEFAULT_TOY
def test_expressions_unique_and_resolve_to_their_object(default_toy):
    inst, refs = default_toy["inst"], default_toy["refs"]
    images, objects = _scene(inst)
    seen = defaultdict(set)
    for r in refs:
        objs = objects[r["image_id"]]
        im = images[r["image_id"]]
        target = [o["ann_id"] for o in objs].index(r["ann_id"])
        for s in r["sentences"]:
            assert s["sent"] not in seen[r["image_id"]], s["sent"]   # no shared sentences
            seen[r["image_id"]].add(s["sent"])
            desc = parse_expression(s["sent"])
            hit = resolve_expression(desc, objs, min(im["width"], im["height"]))
            assert hit == [target], (r["image_id"], s["sent"], hit, target)


@ON_DEFAULT_TOY
def test_expression_variety(default_toy):
    sents = [s["sent"] for r in default_toy["refs"] for s in r["sentences"]]
    kinds = Counter()
    for s in sents:
        d = parse_expression(s)
        kinds["size" if d["selector"] and d["selector"][0] == "size"
              else "pos" if d["selector"] else "attr"] += 1
    assert all(kinds[k] > 0.15 * len(sents) for k in ("attr", "size", "pos")), kinds
    assert sum(len(r["sentences"]) for r in default_toy["refs"]) / len(default_toy["refs"]) >= 2
    vocab = {t for s in sents for t in s.split()}
    assert set(PALETTE) <= vocab and set(SHAPES) <= vocab


@ON_DEFAULT_TOY
def test_text_blind_baselines_are_weak(default_toy):
    inst, refs = default_toy["inst"], default_toy["refs"]
    images, objects = _scene(inst)
    largest = {i: max(objs, key=lambda o: o["area"])["ann_id"] for i, objs in objects.items()}
    central = {}
    for i, objs in objects.items():
        w, h = images[i]["width"], images[i]["height"]
        central[i] = min(objs, key=lambda o: (o["cx"] - w / 2) ** 2 + (o["cy"] - h / 2) ** 2)["ann_id"]
    for pick in (largest, central):
        per_image = defaultdict(list)
        for r in refs:
            per_image[r["image_id"]].append(pick[r["image_id"]] == r["ann_id"])
        assert np.mean([np.mean(v) for v in per_image.values()]) < 0.6
        assert np.mean([x for v in per_image.values() for x in v]) < 0.6
    # colour/shape alone are not shortcuts: many images have a repeated colour or shape
    confusable = sum(1 for objs in objects.values()
                     if len({o["colour"] for o in objs}) < len(objs)
                     or len({o["shape"] for o in objs}) < len(objs))
    assert confusable > 0.6 * len(objects)


@ON_DEFAULT_TOY
def test_cli_prints_summary(default_toy):
    # On the fixture's data root: the CLI finds the dataset complete and only summarises it.
    out = subprocess.run([sys.executable, "-m", "refer.toy", default_toy["data_root"]], cwd=REPO_ROOT,
                         check=True, capture_output=True, text=True, timeout=60).stdout
    for word in ("train", "val", "testA", "testB", "refs", "objects per image"):
        assert word in out

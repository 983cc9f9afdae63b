"""Generate a toy dataset and print its statistics:

    python -m refer.toy DATA_ROOT                  # the toy, in DATA_ROOT/toy
    python -m refer.toy DATA_ROOT --dataset gtoy   # the generalized toy, in DATA_ROOT/gtoy

Programs generate them on first use; this is for looking at them.
"""
import argparse
import json
import os
import time
from collections import Counter

import numpy as np

from refer.refer import load_refs_file

from .gtoy import REFS_FILE, ensure_gtoy_dataset
from .toy import SPLITS, ensure_toy_dataset


def toy_summary(root: str) -> str:
    """Statistics of a toy dataset folder: per split, vocabulary, sizes, a text-blind baseline."""
    with open(os.path.join(root, "instances.json")) as f:
        inst = json.load(f)
    refs = load_refs_file(os.path.join(root, "refs(unc).p"))
    objs_per_img = Counter(a["image_id"] for a in inst["annotations"])
    split_of = {r["image_id"]: r["split"] for r in refs}
    lines = [f"dataset: {root}", f"params: {inst['info']['params']}"]
    lines.append(f"{'split':<6} {'images':>6} {'refs':>6} {'sents':>6} {'obj/img':>8}")
    for sp in SPLITS:
        rs = [r for r in refs if r["split"] == sp]
        ims = {i for i, s in split_of.items() if s == sp}
        n_obj = np.mean([objs_per_img[i] for i in ims]) if ims else 0.0
        lines.append(f"{sp:<6} {len(ims):>6} {len(rs):>6} {sum(len(r['sentences']) for r in rs):>6} "
                     f"{n_obj:>8.2f}")
    n_sent = sum(len(r["sentences"]) for r in refs)
    lines.append(f"total: {len(inst['images'])} images, {len(inst['annotations'])} objects, "
                 f"{len(refs)} refs, {n_sent} sentences "
                 f"({n_sent / max(len(refs), 1):.2f} per ref), "
                 f"{np.mean(list(objs_per_img.values())):.2f} objects per image")
    vocab = {t for r in refs for s in r["sentences"] for t in s["tokens"]}
    lines.append(f"vocabulary: {len(vocab)} words; max sentence length "
                 f"{max(len(s['tokens']) for r in refs for s in r['sentences'])} tokens")
    sizes = Counter((im["width"], im["height"]) for im in inst["images"])
    lines.append("image sizes (WxH): " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(sizes.items())))
    area_of = {a["id"]: a["area"] for a in inst["annotations"]}
    largest = {}
    for a in inst["annotations"]:
        if a["image_id"] not in largest or a["area"] > area_of[largest[a["image_id"]]]:
            largest[a["image_id"]] = a["id"]
    hit = np.mean([largest[r["image_id"]] == r["ann_id"] for r in refs])
    lines.append(f"text-blind 'pick the largest object' accuracy: {hit:.3f}")
    lines.append("examples:")
    cat = {c["id"]: c["name"] for c in inst["categories"]}
    for r in refs[:6]:
        lines.append(f"  image {r['image_id']} ann {r['ann_id']} ({cat[r['category_id']]}): "
                     + " | ".join(s["sent"] for s in r["sentences"]))
    return "\n".join(lines)


def gtoy_summary(root: str) -> str:
    """Refs, sentences, no-target and several-target refs per split of a gtoy folder."""
    with open(os.path.join(root, REFS_FILE)) as handle:
        refs = json.load(handle)
    lines = [f"dataset: {root}"]
    for split in SPLITS:
        part = [r for r in refs if r["split"] == split]
        lines.append(f"{split}: {len(part)} refs, {sum(len(r['sentences']) for r in part)} sentences, "
                     f"{sum(r['no_target'] for r in part)} with no target, "
                     f"{sum(len(r['ann_id']) > 1 for r in part)} with several")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root", help="folder to generate the dataset in (as --refer_data_root)")
    parser.add_argument("--dataset", choices=("toy", "gtoy"), default="toy",
                        help="which generated dataset (default: toy)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.dataset == "toy":
        path = ensure_toy_dataset(args.data_root)
        summary = toy_summary(path)
    else:
        path = ensure_gtoy_dataset(args.data_root)
        summary = gtoy_summary(path)
    print(f"ready in {time.perf_counter() - start:.2f} s")
    print(summary)


if __name__ == "__main__":
    main()

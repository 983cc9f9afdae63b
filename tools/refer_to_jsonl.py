"""Convert a dataset in the REFER layout into the JSONL format (README, "Your own data"): one
{split}.jsonl per split, one line per ref. The two read alike: evaluated with one checkpoint, the
two give the same tables and masks (tests/test_jsonl.py).

    python tools/refer_to_jsonl.py refcoco data/refcoco_jsonl
    python tools/refer_to_jsonl.py refcocog data/refcocog_umd --splitBy umd --masks png
    python -m refer.check --dataset jsonl:data/refcoco_jsonl

Each line: the image's path relative to the output folder, the ref's sentences, its target (the
union of its annotations as one compressed COCO RLE, or with --masks png a PNG written under
masks/; "no_target": true for a gRefCOCO expression that names nothing) and its ref_id as id.
Nothing is copied but the masks of --masks png.
"""
import argparse
import json
import os

from PIL import Image

from refer.catalog import get_dataset
from refer.refer import decode_rle
from utils.logging import run_cli
from utils.paths import DEFAULT_DATA_ROOT


def ref_line(refer, ref, out_dir, masks):
    """The JSON object of one ref."""
    image = refer.image_path(refer.Imgs[ref["image_id"]])
    line = {"id": ref["ref_id"], "image": os.path.relpath(os.path.abspath(image), os.path.abspath(out_dir)),
            "sentences": [sentence["sent"] for sentence in ref["sentences"]]}
    rle = refer.ref_rle(ref)
    if refer.is_no_target(ref):
        line["no_target"] = True
    elif masks == "png":
        name = os.path.join("masks", f"{ref['ref_id']}.png")
        Image.fromarray(decode_rle(rle) * 255).save(os.path.join(out_dir, name))
        line["mask"] = name
    else:
        line["rle"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    return line


def convert(data_root, dataset, splitBy, out_dir, masks="rle"):
    """Write {split}.jsonl files of one partition into `out_dir`; returns {split: lines}."""
    record = get_dataset(dataset)
    refer = record.read(data_root, splitBy or record.default_partition)
    os.makedirs(os.path.join(out_dir, "masks") if masks == "png" else out_dir, exist_ok=True)
    lines = {}
    for ref in refer.Refs.values():
        lines.setdefault(ref["split"], []).append(json.dumps(ref_line(refer, ref, out_dir, masks)))
    for split, split_lines in lines.items():
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(split_lines) + "\n")
    return {split: len(split_lines) for split, split_lines in lines.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="a REFER-layout dataset of the catalog, e.g. refcoco")
    parser.add_argument("out_dir", help="the folder to write the .jsonl files into")
    parser.add_argument("--splitBy", default=None,
                        help="the partition (default: the dataset's, e.g. umd for refcocog)")
    parser.add_argument("--refer_data_root", default=DEFAULT_DATA_ROOT,
                        help="folder holding images/ and the dataset's folder (default: refer/data)")
    parser.add_argument("--masks", choices=("rle", "png"), default="rle",
                        help="the target of each line: rle (exact, in the line) or png (a file "
                             "under masks/) (default: rle)")
    args = parser.parse_args(argv)
    counts = convert(args.refer_data_root, args.dataset, args.splitBy, args.out_dir, args.masks)
    print(f"wrote {', '.join(f'{split}.jsonl ({count} lines)' for split, count in counts.items())} "
          f"to {args.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)

"""Training-loader throughput (items/s) on a synthetic REFER dataset, per number of workers.

Builds ~COCO-sized JPEGs (640x480 by default) in a temporary folder with refer/synthetic.py,
then times one pass of the training loader (decode, resize, normalise, mask decode, tokens)
after one warm-up batch, so worker start-up is not counted. The same pass is then timed reading
latents from a --cache_latents folder instead of images (fp16 (4, S/8, S/8) files as the SD VAE
gives; their values do not matter here, so no model is run).

    python bench/bench_loader.py --num_images 200 --img_size 512 --worker_counts 0 2
"""
import os
import tempfile
import time

import torch

from data import ReferDataset, build_loader
from data.latent_cache import LatentCache
from engine.args import get_parser, nonnegative_int, parse_args, positive_int
from refer.synthetic import make_refer_dataset


def parse_bench_args(argv=None):
    parser = get_parser("bench_loader", __doc__.splitlines()[0])
    group = parser.add_argument_group("benchmark")
    group.add_argument("--num_images", type=positive_int, default=200, help="synthetic images")
    group.add_argument("--image_width", type=positive_int, default=640, help="width of the JPEGs")
    group.add_argument("--image_height", type=positive_int, default=480, help="height of the JPEGs")
    group.add_argument("--worker_counts", type=nonnegative_int, nargs="+", default=[0, 2],
                       help="DataLoader worker counts to compare")
    group.add_argument("--no_latents", action="store_true",
                       help="skip the pass that reads cached latents instead of images")
    return parse_args("bench_loader", argv, parser=parser)


def time_one_pass(dataset, batch_size: int, workers: int) -> tuple[int, float]:
    """(items after the warm-up batch, seconds) for one shuffled training pass."""
    loader = build_loader(dataset, batch_size=batch_size, workers=workers, shuffle=True,
                          distributed=False, seed=0, eval_mode=False)
    batches = iter(loader)
    next(batches)  # warm-up: worker start-up, first decodes
    items, start = 0, time.perf_counter()
    for batch in batches:
        items += batch["mask"].shape[0]
    return items, time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_bench_args(argv)
    torch.manual_seed(0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as root:
        start = time.perf_counter()
        make_refer_dataset(root, "refcoco", "unc", num_images=args.num_images, refs_per_image=1,
                           splits=("train",), special_images=False,
                           image_size=(args.image_width, args.image_height))
        generated = time.perf_counter() - start
        start = time.perf_counter()
        dataset = ReferDataset(root, "refcoco", "unc", split="train", img_size=args.img_size,
                               token_length=args.token_length)
        built = time.perf_counter() - start
        print(f"{len(dataset)} refs, {args.image_width}x{args.image_height} JPEGs -> "
              f"{args.img_size}x{args.img_size}, batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} "
              f"(data generated in {generated:.1f}s, dataset built in {built:.2f}s)")
        print(f"{'input':>14}  {'workers':>7}  {'items':>5}  {'seconds':>7}  {'items/s':>7}")
        for workers in args.worker_counts:
            items, seconds = time_one_pass(dataset, args.batch_size, workers)
            print(f"{'images':>14}  {workers:>7}  {items:>5}  {seconds:>7.2f}  "
                  f"{items / seconds:>7.1f}")
        if not args.no_latents:
            cache = LatentCache(os.path.join(root, "latents"), "bench", args.img_size)
            latent_side = max(args.img_size // 8, 1)
            for key, _ in dataset.unique_images():
                cache.put(key, torch.randn(4, latent_side, latent_side))
            dataset.use_latent_cache(cache)
            for workers in args.worker_counts:
                items, seconds = time_one_pass(dataset, args.batch_size, workers)
                print(f"{'cached latents':>14}  {workers:>7}  {items:>5}  {seconds:>7.2f}  "
                      f"{items / seconds:>7.1f}")


if __name__ == "__main__":
    main()

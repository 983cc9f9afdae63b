"""Evaluate a model (a checkpoint, ours or VPD's released one, or a model folder) on one or all
held-out splits and print the results table.

The model's preset, token length and image size come from the checkpoint. Every sentence of every
ref is evaluated; with several processes (NPROC=4 bash test.sh DATASET CKPT) the refs are sharded
and the counts reduced, so the numbers do not depend on NPROC.
"""
import json
import os

from data.loaders import build_dataset, build_loader
from engine.args import parse_args, reconcile_model_config
from engine.evaluation import evaluate
from engine.evaluators import get_evaluator
from engine.latents import attach_latent_cache
from engine.precision import resolve_precision
from models import VPDSegmenter
from refer.check import preflight
from refer.catalog import get_dataset
from utils.dist import cleanup, init_distributed
from utils.errors import InputError
from utils.io import atomic_write, ensure_writable_file, ensure_writable_folder, file_in_folder
from utils.logging import format_results_table, get_logger, progress_enabled, run_cli, setup_logging
from utils.visualize import comparison_panel, mask_to_image, tensor_to_image


class PredictionWriter:
    """Writes predicted masks ({ref_id}_{sent_id}.png, 0/255) and comparison panels."""

    def __init__(self, masks_dir=None, vis_dir=None, vis_num=0):
        self.masks_dir, self.vis_dir, self.vis_left = masks_dir, vis_dir, vis_num
        for folder in (masks_dir, vis_dir):
            if folder:
                os.makedirs(folder, exist_ok=True)

    def __call__(self, batch, predictions, ious):
        for index, prediction in enumerate(predictions):
            name = f"{batch['ref_ids'][index]}_{batch['sent_ids'][index]}.png"
            if self.masks_dir:
                mask_to_image(prediction.numpy()).save(file_in_folder(self.masks_dir, name))
            if self.vis_dir and self.vis_left > 0:
                image_index = int(batch["image_index"][index])
                panel = comparison_panel(tensor_to_image(batch["image"][image_index]),
                                         batch["mask"][image_index].numpy(), prediction.numpy(),
                                         batch["sentences"][index], float(ious[index]))
                panel.save(file_in_folder(self.vis_dir, name))
                self.vis_left -= 1


def main(argv=None):
    args = parse_args("test", argv, description=__doc__.splitlines()[0])
    if not args.checkpoint:
        raise InputError("test.py needs the model to evaluate: --checkpoint PATH (or --resume "
                         "PATH as in VPD's test.sh); test.sh passes its second argument")
    dist_info = init_distributed(args.dist_backend, args.device, args.local_rank)
    logger = setup_logging(dist_info.is_main)
    check_outputs(args, dist_info.is_main)  # before any work whose results would go there
    device = dist_info.device
    dtype = resolve_precision(args.precision, device)

    model, report = VPDSegmenter.from_pretrained(
        args.checkpoint, device=device, with_report=True,
        configure=lambda config: reconcile_model_config(config, args, args.checkpoint))
    config = model.config
    logger.info(f"loaded {args.checkpoint}: {config.preset}, {config.token_length} tokens, "
                f"{config.img_size} px; {report}")

    splits = (get_dataset(args.dataset).evaluation_splits(args.splitBy) if args.split == "all"
              else [args.split])
    preflight(args.refer_data_root, args.dataset, args.splitBy,
              images=not (args.cache_latents and not args.vis_dir))
    # Panels only from rank 0, so --vis_num is the total; masks from every rank (disjoint refs).
    writer = PredictionWriter(args.save_masks, args.vis_dir if dist_info.is_main else None,
                              args.vis_num)
    use_cache = bool(args.cache_latents) and not args.vis_dir
    if args.cache_latents and args.vis_dir:
        logger.info("--vis_dir draws the images, so they are read instead of the cached latents")
    if use_cache and config.img_size % model.vae_scale_factor:
        raise InputError(f"--cache_latents needs the model's image size to be a multiple of the "
                         f"VAE's downsampling factor {model.vae_scale_factor}; it is {config.img_size}")
    evaluator = get_evaluator(get_dataset(args.dataset).evaluator)
    results_by_split = {split: evaluate_split(args, model, split, evaluator, writer, use_cache,
                                              progress_enabled(dist_info.is_main), dtype, device)
                        for split in splits}
    if dist_info.is_main:
        report_results(args, config, evaluator, results_by_split)
    cleanup()
    return 0


def check_outputs(args, is_main):
    """Whatever test.py is to write must be writable before anything is evaluated: --save_masks
    (every process writes its masks), --vis_dir and --results_json (rank 0)."""
    if args.save_masks:
        ensure_writable_folder(args.save_masks, "--save_masks", what="masks folder")
    if args.vis_dir and is_main:
        ensure_writable_folder(args.vis_dir, "--vis_dir", what="panels folder")
    if args.results_json and is_main:
        ensure_writable_file(args.results_json, "--results_json")


def evaluate_split(args, model, split, evaluator, writer, use_cache, show_progress, dtype, device):
    """One held-out split (sentences swapped with --swap_text), scored by the dataset's evaluator."""
    dataset = build_dataset(args.refer_data_root, args.dataset, args.splitBy, split, model.config,
                            eval_mode=True)
    if args.swap_text:
        swapped, partners = dataset.swap_text()
        get_logger().info(f"{split}: --swap_text paired {swapped} of {len(dataset)} refs with "
                          f"{partners}")
    if use_cache:  # encode each image once; the dataset then reads latents
        attach_latent_cache(model, [dataset], args.cache_latents, device, dtype,
                            args.eval_batch_size, show_progress, workers=args.workers,
                            training=False)
    loader = build_loader(dataset, args.eval_batch_size, args.workers, shuffle=False,
                          drop_last=False, eval_mode=True, pin_memory=args.pin_mem)
    return evaluate(model, loader, device, dtype, evaluator, on_predictions=writer,
                    show_progress=show_progress, desc=split)


def report_results(args, config, evaluator, results_by_split):
    """The table on stdout (the evaluator's columns) and, with --results_json, the JSON."""
    title = f"{args.dataset} ({args.splitBy}), {os.path.basename(os.path.normpath(args.checkpoint))}"
    if args.swap_text:
        title += ", sentences swapped (--swap_text)"
    table = format_results_table(results_by_split, evaluator.columns, evaluator.counts)
    print(f"\n{title}\n{table}\n", flush=True)
    if args.results_json:
        with atomic_write(args.results_json, "w") as handle:
            json.dump({"dataset": args.dataset, "splitBy": args.splitBy,
                       "checkpoint": args.checkpoint, "config": config.to_dict(),
                       "evaluator": evaluator.name, "results": results_by_split}, handle, indent=2)


if __name__ == "__main__":
    run_cli(main)

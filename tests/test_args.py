"""The command line (engine/args.py): per-program parsers, defaults, VPD's flags, early checks."""
import argparse

import pytest

from engine.args import (GROUPS, PAPER_DEFAULTS, PROGRAM_GROUPS, get_parser,
                         model_config, parse_args, reconcile_model_config)
from models import PRESETS, LossConfig, SegmenterConfig, get_preset
from refer.catalog import dataset_names, get_dataset


def flags_of(program):
    return {option for action in get_parser(program)._actions for option in action.option_strings}


def parse_error(program, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(program, argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1, message  # one line, no usage block
    return message


def test_each_program_lists_only_the_flags_it_reads():
    train, test, demo = flags_of("train"), flags_of("test"), flags_of("demo")
    assert {"--epochs", "--lr", "--batch-size", "--output-dir", "--grad_checkpoint"} <= train
    assert not {"--image", "--text", "--vis_dir", "--results_json", "--checkpoint"} & train
    assert {"--checkpoint", "--resume", "--vis_dir", "--swap_text", "--split"} <= test
    assert not {"--epochs", "--lr", "--batch-size", "--output-dir", "--image"} & test
    assert {"--checkpoint", "--image", "--text", "--out", "--sd_path"} <= demo
    assert not {"--epochs", "--split", "--dataset", "--vis_dir", "--workers"} & demo
    help_text = get_parser("demo").format_help()
    assert "--image" in help_text and "--epochs" not in help_text


def test_a_flag_the_program_does_not_read_is_an_error(capsys):
    message = parse_error("test", ["--checkpoint", "x.pth", "--epochs", "3"], capsys)
    assert "unrecognized arguments: --epochs 3" in message
    parse_error("demo", ["--split", "val"], capsys)


def test_every_group_is_used_and_defaults_are_shown():
    used = {group for groups in PROGRAM_GROUPS.values() for group in groups}
    assert used == set(GROUPS)
    for program in PROGRAM_GROUPS:
        parser = get_parser(program)
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and action.dest != "help":
                assert "default" in formatter._get_help_string(action), (program, action.dest)


def test_choices_come_from_the_registries(capsys):
    actions = {action.dest: action for action in get_parser("train")._actions}
    assert tuple(actions["model"].choices) == tuple(PRESETS)
    message = parse_error("train", ["--dataset", "coco"], capsys)
    assert f"unknown dataset 'coco'; expected one of {', '.join(dataset_names())}" in message
    for name in dataset_names():
        assert parse_args("train", ["--dataset", name]).datasets[0][0] == name


def test_joint_dataset_lists(capsys):
    args = parse_args("train", ["--dataset", "refcoco,refcoco+,refcocog"])
    assert args.datasets == [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")]
    assert args.token_length == 77 and args.model_id == "refcoco_refcoco+_refcocog"
    assert parse_args("train", ["--dataset", "refcoco,refcocog:google"]).datasets[1] == ("refcocog", "google")
    assert "refcoco listed twice" in parse_error("train", ["--dataset", "refcoco,refcoco"], capsys)
    # The joint-training rule reads the catalog: datasets marked joint, of one metric family.
    assert parse_args("train", ["--dataset", "refcoco,refclef"]).datasets == [("refcoco", "unc"), ("refclef", "unc")]
    assert "toy cannot join joint training (a recipe of its own); joint training takes datasets of " \
           "one kind marked joint in the catalog: refcoco, refcoco+, refcocog, refclef (one target " \
           "per expression), or grefcoco (several or none)" in parse_error(
               "train", ["--dataset", "refcoco,toy"], capsys)
    assert "'refcoco,grefcoco': refcoco (one target), grefcoco (several or no targets) are scored " \
           "with different metrics" in parse_error("train", ["--dataset", "refcoco,grefcoco"], capsys)
    assert "in a joint list give each dataset's partition" in parse_error(
        "train", ["--dataset", "refcoco,refcocog", "--splitBy", "umd"], capsys)
    assert "test reads one dataset at a time" in parse_error(
        "test", ["--dataset", "refcoco,refcoco+"], capsys)


def test_paper_defaults():
    args = parse_args("train", [])
    assert (args.model, args.img_size, args.batch_size, args.epochs, args.lr, args.wd) == \
        ("vpd", 512, 4, 40, 5e-5, 1e-2)
    assert args.model_id == "refcoco" and args.lr_scale == {"unet": 1.0}
    # The weights' default path is the preset's, resolved when the model is built.
    assert args.sd_path is None and get_preset(args.model).weights.default_path == "./stable-diffusion-v1-5"
    assert args.precision == args.eval_precision == "fp32"  # VPD trained and evaluated in fp32


def test_dataset_defaults_and_flags_win():
    assert parse_args("train", ["--dataset", "refcoco"]).token_length == 40
    refcocog = parse_args("train", ["--dataset", "refcocog"])
    assert refcocog.token_length == 77 and refcocog.splitBy == "umd"
    toy = parse_args("train", ["--dataset", "toy"])
    assert toy.model == "tiny" and toy.sd_path is None and toy.img_size == get_dataset("toy").recipe["img_size"]
    # The Dice term is the toy's (bench/RESULTS.md), not VPD's: off for the real datasets.
    assert toy.dice_weight == 1.0 and parse_args("train", ["--dataset", "refcoco"]).dice_weight == 0.0
    toy = parse_args("train", ["--dataset", "toy", "--img_size", "32", "--lr", "0.5"])
    assert toy.img_size == 32 and toy.lr == 0.5
    assert parse_args("train", ["--token_length", "20"]).token_length == 20
    assert PAPER_DEFAULTS["token_length"] == 77


def test_generated_datasets_cache_their_latents_beside_their_images(tmp_path):
    """toy / gtoy: --cache_latents defaults to latents/ in the dataset's own folder (rebuilt data
    takes its latents with it); `none` turns it off; the real datasets cache nothing unless told."""
    for program, extra in (("train", []), ("test", ["--checkpoint", "x.pth"])):
        for dataset in ("toy", "gtoy"):
            args = parse_args(program, ["--dataset", dataset, "--refer_data_root", str(tmp_path)] + extra)
            assert args.cache_latents == str(tmp_path / dataset / "latents")
    assert parse_args("train", ["--dataset", "toy", "--cache_latents", "none"]).cache_latents is None
    assert parse_args("train", ["--dataset", "toy", "--cache_latents", "mine"]).cache_latents == "mine"
    assert parse_args("train", ["--dataset", "refcoco"]).cache_latents is None


def test_test_and_demo_leave_the_model_settings_to_the_checkpoint():
    args = parse_args("test", ["--dataset", "toy", "--checkpoint", "x.pth"])
    assert (args.model, args.img_size, args.token_length, args.attn_grad) == (None, None, None, None)
    assert args.workers == get_dataset("toy").recipe["workers"]


def test_vpd_command_lines(capsys):
    # VPD's test.sh: --resume CKPT --workers 4 --ddp_trained_weights --img_size 512 ...
    args = parse_args("test", ["--dataset", "refcoco", "--split", "val", "--resume", "ckpt.pth",
                               "-j", "0", "--ddp_trained_weights", "--img_size", "512",
                               "--device", "cuda:0"])
    assert (args.checkpoint, args.workers, args.img_size, args.device) == ("ckpt.pth", 0, 512, "cuda:0")
    assert "--ddp_trained_weights is accepted for VPD's command lines but changes nothing" in capsys.readouterr().err
    # VPD's train.sh through torch.distributed.launch (torch 2.x passes --local-rank=N).
    args = parse_args("train", ["-b", "4", "--weight-decay", "0.02", "--local-rank=1", "--pin_mem",
                                "--print-freq", "10", "--amsgrad"])
    assert (args.batch_size, args.wd, args.local_rank, args.pin_mem, args.print_freq, args.amsgrad) == \
        (4, 0.02, 1, True, 10, True)
    assert parse_args("train", ["--local_rank", "0"]).local_rank == 0


@pytest.mark.parametrize("program,argv,expected", [
    ("test", ["--dataset", "refcoco", "--split", "testC"], "--split: refcoco (unc) has no held-out split 'testC'"),
    ("train", ["--dataset", "refcoco", "--split", "train"], "--split: refcoco (unc) has no held-out split 'train'"),
    ("train", ["--dataset", "refcoco", "--splitBy", "umd"], "--splitBy: refcoco has no 'umd' partition"),
    ("train", ["--dataset", "refcocog", "--splitBy", "unc"], "--splitBy: refcocog has no 'unc' partition"),
    ("train", ["--eval_batch_size", "0"], "argument --eval_batch_size: must be >= 1, got 0"),
    ("train", ["--token_length", "0"], "argument --token_length: must be >= 2, got 0"),
    ("train", ["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    ("train", ["--lr", "-1"], "argument --lr: must be > 0"),
    ("test", ["--vis_num", "-3"], "argument --vis_num: must be >= 0, got -3"),
    ("train", ["--img_size", "big"], "argument --img_size: expected an integer, got 'big'"),
    ("train", ["--device", "tpu"], "argument --device: expected auto, cpu, cuda or cuda:N"),
    ("train", ["--accum_steps", "0"], "argument --accum_steps: must be >= 1, got 0"),
    ("train", ["--warmup_epochs", "-1"], "argument --warmup_epochs: must be >= 0"),
    ("train", ["--frozen_bf16"], "argument --frozen_bf16: needs --precision bf16 (got fp32)"),
    ("train", ["--no_target_area", "1.5"], "argument --no_target_area: must be in [0, 1), got 1.5"),
    ("train", ["--dataset", "refcoco", "--no_target_area", "0.01"],
     "argument --no_target_area: only for datasets whose expressions may refer to nothing"),
    ("train", ["--lr_scale", "unet"], "argument --lr_scale: expected GROUP=VALUE such as unet=0.01, got 'unet'"),
    ("train", ["--lr_scale", "unet=-1"], "argument --lr_scale: must be >= 0"),
    ("train", ["--model", "evp", "--lr_scale", "clip=0.1"],
     "argument --lr_scale: the evp model has no optimizer group clip; its groups: unet, text_encoder, vae, head"),
    ("train", ["--lr_scale", "vae=0.1"], "argument --lr_scale: the vpd model has no optimizer group vae; its "
                                         "groups: unet, head"),
    ("train", ["--model", "evp", "--cache_latents", "latents"],
     "argument --cache_latents: the evp model trains its VAE, so its latents change every step"),
    ("train", ["--model", "evp", "--precision", "bf16", "--frozen_bf16"],
     "argument --frozen_bf16: the evp model has no frozen parts"),
    # The model id names files in --output-dir and the default log folder: a plain name only.
    ("train", ["--model_id", "../../x"], "argument --model_id: '../../x' is not a plain name"),
    ("train", ["--model_id", "/abs"], "argument --model_id: '/abs' is not a plain name"),
    ("train", ["--model_id", ".."], "argument --model_id: '..' is not a plain name"),
])
def test_bad_values_are_one_line_errors_naming_the_flag(program, argv, expected, capsys):
    assert expected in parse_error(program, argv, capsys)


def test_the_evp_presets_recipe_is_its_default_and_lr_scales_override_one_group():
    args = parse_args("train", ["--model", "evp"])
    assert (args.lr, args.wd, args.epochs, args.batch_size, args.warmup_epochs, args.weight_decay_rule,
            args.token_length, args.img_size) == (8e-5, 1e-2, 20, 3, 1.0, "evp", 40, 512)
    assert args.lr_scale == {"unet": 1e-4, "text_encoder": 1e-4, "vae": 1e-4}
    args = parse_args("train", ["--model", "evp", "--lr_scale", "unet=0.01", "--lr_scale", "vae=0.01"])
    assert args.lr_scale == {"unet": 0.01, "text_encoder": 1e-4, "vae": 0.01}
    assert parse_args("train", ["--lr_scale", "head=0.5"]).lr_scale == {"unet": 1.0, "head": 0.5}
    # The toy's latent cache is its default only for models whose VAE is frozen.
    assert parse_args("train", ["--dataset", "toy"]).cache_latents
    assert parse_args("train", ["--dataset", "toy", "--model", "evp-tiny"]).cache_latents is None


def test_out_folder_is_refused(tmp_path, capsys):
    message = parse_error("demo", ["--out", str(tmp_path)], capsys)
    assert f"--out: {tmp_path} is a folder" in message


def test_model_config_from_flags_and_from_a_checkpoint():
    args = parse_args("train", ["--dataset", "toy", "--token_length", "12"])
    assert model_config(args) == SegmenterConfig(preset="tiny", token_length=12, img_size=64,
                                                 attn_grad=True, decoder_hidden=32, pad_token_id=49407,
                                                 loss=LossConfig.with_terms(dice=1.0))  # the toy's
    args = parse_args("train", ["--dataset", "refcoco", "--loss_weight", "cross_entropy=0.5"])
    assert model_config(args).loss == LossConfig(terms={"cross_entropy": 0.5})  # VPD's without Dice
    saved = SegmenterConfig(preset="tiny", token_length=12, img_size=64, sd_path="/weights/sd")
    test_args = parse_args("test", ["--dataset", "toy", "--checkpoint", "c.pth", "--img_size", "64"])
    assert reconcile_model_config(saved, test_args, "c.pth") == saved  # agreeing flags are fine
    test_args = parse_args("test", ["--dataset", "toy", "--checkpoint", "c.pth", "--sd_path", "/elsewhere"])
    assert reconcile_model_config(saved, test_args, "c.pth").sd_path == "/elsewhere"
    test_args = parse_args("test", ["--dataset", "toy", "--checkpoint", "c.pth", "--token_length", "40"])
    with pytest.raises(ValueError, match="--token_length 40 contradicts c.pth, which holds a model "
                                         "with token_length 12"):
        reconcile_model_config(saved, test_args, "c.pth")


def test_no_target_area_is_part_of_the_model_config_and_gtoy_sets_it():
    args = parse_args("train", ["--dataset", "gtoy"])
    assert model_config(args).no_target_area == get_dataset("gtoy").recipe["no_target_area"] > 0
    assert model_config(parse_args("train", ["--dataset", "toy"])).no_target_area == 0.0
    args = parse_args("train", ["--dataset", "gtoy", "--no_target_area", "0"])
    assert model_config(args).no_target_area == 0.0


def test_help_texts_give_the_recipes_of_the_catalog():
    """A dataset registered with a recipe shows in the flags' help (the defaults come from it)."""
    from refer.catalog import DatasetRecord, register_dataset, unregister_dataset
    register_dataset(DatasetRecord("mine", image_dir="mine/images", partitions={"unc": ("train", "val")},
                                   recipe={"workers": 2, "channels_last": True}))
    try:
        help_text = " ".join(get_parser("train").format_help().split())
        assert "per GPU (default: 4; toy, gtoy: 0; mine: 2)" in help_text
        assert "(default: off; toy, gtoy, mine: on, ~6% faster on a CPU)" in help_text
        assert parse_args("train", ["--dataset", "mine"]).workers == 2
    finally:
        unregister_dataset("mine")

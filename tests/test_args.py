from utils.args import PAPER_DEFAULTS, get_parser, parse_args


def test_every_flag_has_help():
    for action in get_parser()._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest


def test_paper_defaults():
    args = parse_args([])
    assert (args.model, args.img_size, args.batch_size, args.epochs, args.lr, args.wd) == \
        ("vpd", 512, 4, 40, 5e-5, 1e-2)
    assert args.token_length == 77 and args.model_id == "refcoco" and args.unet_lr_scale == 1.0
    assert args.sd_path.endswith("stable-diffusion-v1-5")


def test_dataset_defaults_and_flags_win():
    toy = parse_args(["--dataset", "toy"])
    assert toy.model == "tiny" and toy.sd_path is None and toy.img_size != PAPER_DEFAULTS["img_size"]
    toy = parse_args(["--dataset", "toy", "--img_size", "64", "--lr", "0.5"])
    assert toy.img_size == 64 and toy.lr == 0.5
    assert parse_args(["--token_length", "40"]).token_length == 40

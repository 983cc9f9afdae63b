"""The GPU suite's measuring scripts, run at toy size on a CPU: the profile of a training step,
bench_model's rows over several batch sizes, and the reading of a train.py run's own record."""
import warnings

import pytest
import torch

from bench import bench_model, profile_step, train_run

SMALL = ["--model", "tiny", "--img_size", "32", "--token_length", "8", "--threads", "1"]


def test_profile_step_charges_the_step_to_phases_places_and_kinds(capsys):
    assert profile_step.main([*SMALL, "--batch-size", "2", "--steps", "1", "--warmup", "1",
                              "--variant", "cached_latents+fused_adamw"]) == 0
    text = capsys.readouterr().out
    tables = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] in ("phase", "place", "kind"):
            table = tables.setdefault(cells[0], {})
        elif line.startswith("| ") and len(cells) == 5 and not cells[0].startswith("-"):
            table[cells[0]] = float(cells[3])
    assert {"forward", "loss", "backward", "optimizer", "data (H2D)"} <= set(tables["phase"])
    assert {"UNet down_blocks.1", "UNet mid_block", "UNet up_blocks.2", "decoder",
            "text adapter"} <= set(tables["place"])
    assert {"GroupNorm", "self-attention (SDPA)", "convolution",
            "cross-attention, recorded maps (explicit fp32 softmax)"} <= set(tables["kind"])
    # Backward time is charged to the modules whose forward made it.
    assert tables["phase"]["backward"] > 0 and tables["place"]["UNet up_blocks.2"] > 0
    assert "Top 15 operators" in text


def test_bench_model_measures_each_batch_size_from_the_same_weights(capsys):
    assert bench_model.main([*SMALL, "--batch_sizes", "2", "4", "--steps", "1", "--warmup", "1",
                             "--variants", "cached_latents", "cached_latents+sdpa_maps"]) == 0
    out = capsys.readouterr().out
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line
            for line in out.splitlines() if line.startswith("| cached_latents")}
    assert set(rows) == {("cached_latents", "2"), ("cached_latents", "4"),
                         ("cached_latents+sdpa_maps", "2"), ("cached_latents+sdpa_maps", "4")}
    # The same weights at every size: the cached-latents rows agree with fp32 (up to the latents'
    # fp16 rounding); the timing-only variant's uniform maps do not give VPD's logits.
    assert "100.00 |" in rows[("cached_latents", "4")] and "error" not in out
    assert "| 1.3" not in rows[("cached_latents", "2")]  # not a 0.0013 TFLOP column misprint
    assert bench_model.H200_DENSE_BF16_TFLOPS == 989.0


def test_the_timing_only_maps_leave_the_model_unchanged_elsewhere():
    args = bench_model.parse_bench_args(SMALL)
    plain = bench_model.build(args, bench_model.Variant.parse("fp32"), torch.device("cpu"))
    timing = bench_model.build(args, bench_model.Variant.parse("sdpa_maps"), torch.device("cpu"))
    swapped = {name for name, processor in timing.backbone.unet.attn_processors.items()
               if isinstance(processor, bench_model.TimingOnlySDPARecorder)}
    assert swapped and {name.removesuffix(".processor") for name in swapped} == set(
        timing.backbone.recording_attention_layers)
    assert not any(isinstance(p, bench_model.TimingOnlySDPARecorder)
                   for p in plain.backbone.unet.attn_processors.values())


def test_train_run_reads_the_runs_record(tmp_path):
    rows = [{"kind": "iteration", "iteration": 10 * i, "images_per_s": rate}
            for i, rate in enumerate((20.0, 80.0, 80.0, 40.0), start=1)]
    rows.append({"kind": "epoch", "epoch": 1, "images_per_s": 55.0, "train_seconds": 70.0,
                 "peak_memory_bytes": 2**31, "val": {"toy": {"sentences": 400, "seconds": 2.0}}})
    bench = tmp_path / "eager.md"
    bench.write_text("| variant | batch | train img/s | vs fp32 |\n|---|---|---|---|\n"
                     "| bf16 | 32 | 64.00 | n/a |\n")
    assert train_run.bench_row_img_s(bench, "bf16 | 32") == 64.0
    text = train_run.summary(rows, compare=("bf16 | 32", 64.0))
    assert "| 60.00 (median 80.00, range 40.00-80.00) |" in text  # 3 intervals after the first
    assert "train.py at 93.8 % of it" in text
    assert "| validation (toy): sentences/s | 200.0 " in text and "2.00 GiB" in text


def test_train_py_builds_random_weights_only_when_asked(toy_root, tmp_path, monkeypatch):
    """--random_weights is the explicit opt-in (models.build_model(pretrained=False)) that
    bench/train_run.py uses for the full-size model without its weights; without it train.py
    builds from the preset's pretrained weights. It never goes with --sd_path."""
    import engine.trainer
    from tests.programs import main_here, train_command

    built = []

    def recording_build(config, pretrained=True):
        built.append(pretrained)
        raise RuntimeError("built")

    monkeypatch.setattr(engine.trainer, "build_model", recording_build)
    for flags in ([], ["--random_weights"]):
        with pytest.raises(RuntimeError, match="built"):
            main_here("train.py", train_command(toy_root, tmp_path / str(len(built)), 1, *flags)[2:])
    assert built == [True, False]


@pytest.mark.parametrize("flags, message", [(["--bn_group_size", "3"], "does not divide"),
                                            (["--compile", "fastest"], "invalid choice"),
                                            (["--random_weights", "--sd_path", "sd"], "give one")])
def test_speed_flags_are_checked(flags, message, capsys):
    from engine.args import parse_args

    with pytest.raises(SystemExit):
        parse_args("train", ["--batch-size", "4", *flags])
    assert message in capsys.readouterr().err
    args = parse_args("train", ["--batch-size", "32", "--bn_group_size", "4", "--compile"])
    assert (args.bn_group_size, args.compile) == (4, "default")


def test_bench_predict_reports_predict_py_on_random_weights(capsys):
    """The GPU suite's command for predict.py (vpd at 512 px with --random_weights there), at toy size."""
    from bench import bench_predict

    assert bench_predict.main(["--count", "3", "--size", "64x48", "--", "--model", "tiny", "--random_weights",
                               "--img_size", "32", "--token_length", "8", "--device", "cpu", "-j", "0"]) == 0
    out = capsys.readouterr().out
    assert "3 image(s) predicted in " in out and " images/s on 1 process(es)" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| `--model tiny --random_weights")]
    assert "| 3 at 64 x 48 | 2 |" in row and float(row.rstrip(" |").rsplit("|", 1)[1]) > 0

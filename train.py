"""Train a VPD referring segmenter. Launch with train.sh (torchrun), or `python train.py` for one process.

After every epoch the val split is evaluated (all sentences, sharded over the processes);
`checkpoint_last_{model_id}.pth` is written every epoch and `model_best_{model_id}.pth` whenever
the val score improves. Rerunning the same command resumes from the last checkpoint; SIGTERM or
Ctrl-C at any moment ends the run cleanly (mid-epoch: with a checkpoint of that very batch). The
loop and what happens around it: engine/trainer.py.
"""
from engine.args import parse_args
from engine.signals import StopRequest
from engine.trainer import Trainer
from utils.logging import run_cli


def main(argv=None):
    stop = StopRequest().install()  # first: a stop at any moment of set-up ends the run cleanly
    args = parse_args("train", argv, description=__doc__.splitlines()[0])
    return Trainer(args, stop=stop).fit()


if __name__ == "__main__":
    run_cli(main)

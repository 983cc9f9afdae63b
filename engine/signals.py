"""Stop requests: SIGTERM / SIGINT become a flag that the loops check at safe points."""
import signal

import torch

from utils.dist import all_reduce_sum, is_distributed


class StopRequest:
    """Turns SIGTERM/SIGINT (a scheduler's pre-emption, Ctrl-C) into a flag checked between steps,
    so the loop can save a checkpoint and exit cleanly instead of dying mid-write."""

    def __init__(self):
        self.requested = False
        self.signal_name = None

    def install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.request(signal.Signals(signum).name)

    def request(self, reason):
        """Ask the loops to stop at the next safe point; `reason` names it in messages (the
        signal's name)."""
        self.requested = True
        self.signal_name = reason

    def agreed(self):
        """True on every process once any of them was signalled, so all stop at the same step
        (a rank leaving the loop alone would leave the others waiting in DDP's all-reduce). The
        flag is summed on the host (gloo, utils.dist.process_group_backend): checking it after
        every step does not wait for the GPU."""
        if not is_distributed():
            return self.requested
        return bool(all_reduce_sum(torch.tensor([int(self.requested)])).item())

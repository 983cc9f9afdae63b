"""utils/cpu_threads.py: one torch thread per core other processes leave free."""
import os
import subprocess
import sys

import pytest
import torch

import engine.hooks
import engine.latents
from tests.programs import main_here, train_command
from utils.cpu_threads import CpuThreads, machine_ticks, own_ticks, threads_for_free_cores


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_for_free_cores():
    assert threads_for_free_cores(cores=2, others=0.0, max_threads=2) == 2
    assert threads_for_free_cores(cores=2, others=0.67, max_threads=2) == 1  # sharing with spinners
    assert threads_for_free_cores(cores=2, others=2.0, max_threads=2) == 1  # never fewer than 1
    assert threads_for_free_cores(cores=16, others=4.2, max_threads=8) == 8  # never more than asked
    assert threads_for_free_cores(cores=16, others=10.0, max_threads=8) == 6


class FakeMachine:
    """/proc readings of a 2-core machine: each `advance` adds seconds of busy time."""

    def __init__(self):
        self.now, self.busy, self.total, self.own = 0.0, 0, 0, 0

    def advance(self, seconds, own_cores, other_cores, ticks_per_second=100):
        self.now += seconds
        self.total += int(2 * seconds * ticks_per_second)
        self.own += int(own_cores * seconds * ticks_per_second)
        self.busy += int((own_cores + other_cores) * seconds * ticks_per_second)

    def governor(self, **kwargs):
        return CpuThreads(max_threads=2, cores=2, interval=5.0, clock=lambda: self.now,
                          read_machine=lambda: (self.busy, self.total), read_own=lambda: self.own,
                          **kwargs)


def test_threads_follow_the_cores_other_processes_take(restore_threads):
    torch.set_num_threads(2)
    machine, changes = FakeMachine(), []
    governor = machine.governor(on_change=lambda old, new, others: changes.append((old, new, round(others, 2))))

    machine.advance(6, own_cores=2.0, other_cores=0.0)
    assert governor.poll() == 2 and changes == []
    # Another process takes its share: with our 2 spinning threads it gets 2/3 of a core.
    machine.advance(6, own_cores=1.33, other_cores=0.67)
    assert governor.poll() == 1 and torch.get_num_threads() == 1
    assert changes == [(2, 1, 0.67)]
    # Readings closer together than the interval change nothing.
    machine.advance(1, own_cores=1.0, other_cores=0.0)
    assert governor.poll() == 1
    machine.advance(6, own_cores=1.0, other_cores=1.0)
    assert governor.poll() == 1
    # The other process ends: both threads again.
    machine.advance(6, own_cores=1.0, other_cores=0.0)
    assert governor.poll() == 2 and torch.get_num_threads() == 2
    assert changes[-1] == (1, 2, 0.0)


def test_without_proc_stat_nothing_changes(restore_threads):
    torch.set_num_threads(2)
    governor = CpuThreads(max_threads=2, cores=2, interval=0.0, read_machine=lambda: None,
                          read_own=lambda: 0)
    assert governor.poll() == 2 and torch.get_num_threads() == 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc only")
def test_own_ticks_count_this_process_and_its_children():
    busy, total = machine_ticks()
    assert 0 <= busy <= total
    # A child that burns 0.5 s of CPU and then waits: its time counts as this process tree's.
    child = subprocess.Popen([sys.executable, "-c",
                              "import time, sys\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.5: pass\n"
                              "print('done', flush=True)\ntime.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        with open(f"/proc/{os.getpid()}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        mine = int(fields[11]) + int(fields[12])
        ticks_per_second = os.sysconf("SC_CLK_TCK")
        assert own_ticks() - mine >= 0.4 * ticks_per_second
    finally:
        child.kill()
        child.wait()


def test_train_py_follows_the_free_cores_while_it_fills_the_latent_cache(toy_root, tmp_path, monkeypatch):
    """The governor is polled after every cached batch, not only from the first training step:
    a core taken by another process is given up while the VAE encodes (measured in bench/RESULTS.md:
    a busy run's cache took 26 s before, 11 s after)."""
    filling, polls = [], []
    fill_latent_cache = engine.latents.fill_latent_cache

    def recording_fill(*args, **kwargs):
        filling.append(True)
        try:
            return fill_latent_cache(*args, **kwargs)
        finally:
            filling.pop()

    class RecordingCpuThreads(CpuThreads):
        def poll(self):
            polls.append("caching" if filling else "training")
            return super().poll()

    monkeypatch.setattr(engine.latents, "fill_latent_cache", recording_fill)
    monkeypatch.setattr(engine.hooks, "CpuThreads", RecordingCpuThreads)  # CpuThreadsHook's
    assert main_here("train.py", train_command(toy_root, tmp_path / "ckpt", 1, "--cache_latents",
                                               str(tmp_path / "cache"))[2:]) == 0
    assert "caching" in polls and "training" in polls

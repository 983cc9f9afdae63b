import signal

import pytest

from refer.toy import ensure_toy_dataset


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A small toy dataset (24 train, 8 val and 8 test images at 64 px) shared by the program tests."""
    root = tmp_path_factory.mktemp("refer_data")
    ensure_toy_dataset(str(root), num_train_images=24, num_eval_images=8, image_size=64)
    return str(root)


@pytest.fixture
def restore_signal_handlers():
    """For tests that call a program's main() here: it installs SIGTERM/SIGINT handlers."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def pytest_configure(config):
    # One intra-op thread in this process: the suite runs tests in parallel processes (and the
    # programs it starts use OMP_NUM_THREADS=1); several OpenMP threads per process on shared
    # cores wait on each other and run many times slower.
    import torch

    torch.set_num_threads(1)


# The modules whose tests start training and evaluation programs, longest first (about 190, 180
# and 40 s on 2 cores; test_jsonl.py 124 s with the cores four times oversubscribed, test_predict.py
# 54 s with them twice, the last two 37 and 32 s). pytest-xdist hands tests out in collection order, a group at a time; collected last
# (alphabetically), these left one worker running alone for a minute.
LONG_MODULES = ("test_faults.py", "test_train_eval.py", "test_app.py", "test_jsonl.py",
                "test_predict.py", "test_gres.py", "test_toy_learning.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: the order within a module stays

"""The tiny model really learns to use the text (not just that training code runs).

On a handful of toy images, every image has several referred objects, so fitting the training
refs is only possible by reading the sentence. After a few hundred steps the model must score far
better with the true sentences than with sentences swapped between objects of the same image.
"""
import torch

from data.loaders import build_loader, set_loader_epoch
from data.refer_dataset import ReferDataset
from refer.toy import ensure_toy_dataset
from models import create_segmenter
from engine.evaluation import evaluate
from engine.training import train_one_epoch
from utils.optim import build_optimizer, build_scheduler

IMG_SIZE, TOKEN_LENGTH = 32, 16


def test_tiny_model_learns_to_read_the_text(tmp_path):
    root = str(tmp_path)
    ensure_toy_dataset(root, num_train_images=6, num_eval_images=4, image_size=64)
    train_set = ReferDataset(root, "toy", "unc", "train", IMG_SIZE, TOKEN_LENGTH)
    torch.manual_seed(0)
    model = create_segmenter("tiny", token_length=TOKEN_LENGTH, attn_grad=True)
    loader = build_loader(train_set, batch_size=8, shuffle=True, seed=0)
    epochs = 200 // len(loader)
    optimizer = build_optimizer(model, lr=2e-3, weight_decay=1e-2)
    scheduler = build_scheduler(optimizer, epochs * len(loader))
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch, seed=0)
        train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"), torch.float32,
                        epoch, show_progress=False)

    scores = {}
    for name in ("true", "swapped"):
        eval_set = ReferDataset(root, "toy", "unc", "train", IMG_SIZE, TOKEN_LENGTH, eval_mode=True)
        if name == "swapped":
            assert eval_set.swap_text_within_images() == len(eval_set)  # every image has >= 2 refs
        eval_loader = build_loader(eval_set, batch_size=8, eval_mode=True)
        scores[name] = evaluate(model, eval_loader, torch.device("cpu"), torch.float32,
                                show_progress=False)["oIoU"]
    assert scores["true"] > 50.0, scores
    assert scores["true"] > 2 * scores["swapped"], scores

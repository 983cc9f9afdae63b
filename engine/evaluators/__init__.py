"""How each dataset's predictions are scored: one `Evaluator` record per metric family, named by
the dataset's catalog record (`DatasetRecord.evaluator`: "ris" for one target per expression,
"gres" for several or none), as detectron2 gives each dataset an evaluator.

An evaluator lists its metrics (utils.metrics.Metric subclasses: each sees every sentence's
predicted and target masks and keeps named counts) and declares what the programs show of them:
the result that picks the best epoch, the results table's columns, the epoch log line, the curves
of curves.png, and the per-sentence score of validation panels. Nothing else in the repository
decides how a dataset is scored.

`register_evaluator(Evaluator(...))` adds one (or, with `replace=True`, extends one: boundary_iou.py
adds boundary IoU to "ris" in one file). Every module in this folder is imported with
`engine.evaluators`.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from utils.metrics import Metric

__all__ = ["EVALUATORS", "Evaluator", "get_evaluator", "register_evaluator"]


@dataclass(frozen=True)
class Evaluator:
    """A metric family.

    Args:
        name: what catalog records call it.
        metrics: classes (or functions) making a fresh `Metric` per evaluated split; their result
            rows are merged.
        score: the result the best epoch is chosen by (higher is better; the mean over datasets in
            joint training).
        columns: the results table's metric columns (test.py), in %.
        counts: the table's count columns ("refs" is counted by the evaluation loop).
        log: the results the epoch's log line shows (default: the score).
        curves: the results curves.png draws by epoch (default: those of the log line).
        sentence_score: the per-sentence score validation panels and --vis_dir captions show.
    """

    name: str
    metrics: tuple[Callable[[], Metric], ...]
    score: str
    columns: tuple[str, ...]
    counts: tuple[str, ...] = ("refs", "sentences")
    log: tuple[str, ...] = ()
    curves: tuple[str, ...] = ()
    sentence_score: str = "IoU"

    def __post_init__(self):
        object.__setattr__(self, "log", tuple(self.log) or (self.score,))
        object.__setattr__(self, "curves", tuple(self.curves) or self.log)

    def build_metrics(self) -> list[Metric]:
        return [make() for make in self.metrics]


EVALUATORS: dict[str, Evaluator] = {}


def register_evaluator(evaluator: Evaluator, replace: bool = False) -> Evaluator:
    """Make an evaluator known to catalog records (`DatasetRecord(..., evaluator=name)`). A name is
    registered once; `replace=True` swaps the record (extending a built-in one)."""
    if not isinstance(evaluator, Evaluator):
        raise TypeError(f"register_evaluator takes an Evaluator, got {type(evaluator).__name__}")
    if evaluator.name in EVALUATORS and not replace:
        raise ValueError(f"an evaluator named {evaluator.name!r} is registered already "
                         f"(replace=True swaps it)")
    EVALUATORS[evaluator.name] = evaluator
    return evaluator


def get_evaluator(evaluator: str | Evaluator) -> Evaluator:
    """The registered evaluator of a name (an Evaluator is returned as it is)."""
    if isinstance(evaluator, Evaluator):
        return evaluator
    if evaluator not in EVALUATORS:
        raise ValueError(f"unknown evaluator {evaluator!r}; registered: {', '.join(EVALUATORS)}")
    return EVALUATORS[evaluator]


from . import referring  # noqa: E402  first: the built-in families the others extend

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

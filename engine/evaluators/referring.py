"""The two built-in metric families: RIS (one target per expression: LAVT's and VPD's oIoU,
mIoU, P@t; the best epoch by oIoU) and GRES (several targets or none: ReLA's gIoU, cIoU, N-acc,
T-acc, Pr@t; the best epoch by gIoU). The maths is in utils/metrics.py."""
from utils.metrics import GRES_THRESHOLDS, PRECISION_THRESHOLDS, GRESMetric, RISMetric

from . import Evaluator, register_evaluator

RIS = register_evaluator(Evaluator(
    "ris", metrics=(RISMetric,), score="oIoU",
    columns=(*(f"P@{t:g}" for t in PRECISION_THRESHOLDS), "oIoU", "mIoU"), log=("oIoU", "mIoU")))

GRES = register_evaluator(Evaluator(
    "gres", metrics=(GRESMetric,), score="gIoU",
    columns=("gIoU", "cIoU", "N-acc", "T-acc", *(f"Pr@{t:g}" for t in GRES_THRESHOLDS)),
    counts=("refs", "sentences", "no_target"), log=("gIoU", "cIoU", "N-acc", "T-acc"),
    curves=("gIoU", "cIoU")))

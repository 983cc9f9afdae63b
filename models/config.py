"""The segmenter's identity: everything that decides its architecture and where its frozen weights
come from, recorded in every checkpoint and model folder so a saved model rebuilds itself
(`models.build_model(config)`), as diffusers' `register_to_config` does for its models."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import InputError
from utils.io import atomic_write

__all__ = ["SegmenterConfig", "LossConfig", "ConfigError", "BOUNDS"]

# The allowed range of every integer setting: beyond it a model is not a VPD-like segmenter but a
# memory error (an img_size of 100000 asks for terabytes). A preset may narrow a range further
# (token_length: its text encoder's positions, models/registry.py).
BOUNDS = {
    "token_length": (2, 512),
    "img_size": (16, 2048),
    "decoder_hidden": (1, 4096),
    "pad_token_id": (0, 1_000_000),
}


class ConfigError(InputError, ValueError):
    """A config value outside its range, or a config file that is not one of ours."""


@dataclass(frozen=True)
class LossConfig:
    """The training loss: a weighted sum of terms (models/loss.py), recorded with the model like
    the rest of its config, so a checkpoint says what it was trained with and a resumed run must
    train with the same.

    Args:
        class_weights: the (background, object) class weights the terms read (cross-entropy's
            `weight`; VPD and LAVT: 0.9, 1.1).
        terms: term name -> weight (a mapping, kept as sorted (name, weight) pairs); the names are
            those of `models.loss.LOSS_TERMS` (built in: cross_entropy, dice;
            `models.register_loss_term` adds one). Terms of weight 0 are left out; the sum runs in
            alphabetical order of the names. VPD: cross-entropy alone; the toy's recipe adds Dice
            with weight 1 (`--dice_weight`).
    """

    class_weights: tuple[float, float] = (0.9, 1.1)
    terms: Mapping[str, float] | tuple[tuple[str, float], ...] = (("cross_entropy", 1.0),)

    def __post_init__(self):
        weights = self.class_weights
        if (not isinstance(weights, (list, tuple)) or len(weights) != 2
                or not all(_is_number(w) and w >= 0 for w in weights)):
            raise ConfigError(f"class_weights must be two non-negative numbers (background, "
                              f"object), got {weights!r}")
        object.__setattr__(self, "class_weights", tuple(float(w) for w in weights))
        try:
            terms = dict(self.terms)
        except (TypeError, ValueError):
            terms = None
        if terms is None or not all(isinstance(name, str) and name for name in terms):
            raise ConfigError(f"terms must map term names to weights, got {self.terms!r}")
        bad = {name: weight for name, weight in terms.items() if not (_is_number(weight) and weight >= 0)}
        if bad:
            raise ConfigError(f"term weights must be non-negative numbers, got {bad}")
        object.__setattr__(self, "terms", tuple((name, float(terms[name])) for name in sorted(terms)
                                                if terms[name]))

    @classmethod
    def with_terms(cls, **terms: float) -> LossConfig:
        """VPD's cross-entropy (weight 1) with other terms' weights given or changed:
        `LossConfig.with_terms(dice=1.0)`."""
        return cls(terms={"cross_entropy": 1.0, **terms})

    def weight(self, term: str) -> float:
        """The weight of a term (0 when the loss leaves it out)."""
        return dict(self.terms).get(term, 0.0)

    def to_dict(self) -> dict:
        return {"class_weights": list(self.class_weights), "terms": dict(self.terms)}

    @classmethod
    def from_dict(cls, values: Mapping, source: str = "loss") -> LossConfig:
        return _from_dict(cls, values, source, "loss settings")

    def __repr__(self) -> str:
        return repr(self.to_dict())

    def __str__(self) -> str:  # the training log's: "1 x cross_entropy + 0.5 x focal (class weights 0.9, 1.1)"
        terms = " + ".join(f"{weight:g} x {name}" for name, weight in self.terms) or "no term"
        return f"{terms} (class weights {self.class_weights[0]:g}, {self.class_weights[1]:g})"


def _from_dict(cls, values, source: str, what: str):
    """`cls(**values)` of settings read from `source` (a file, a checkpoint), every error naming
    it: not a dict, settings this version does not know, a value out of its range."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source} holds a {type(values).__name__}, expected a dict of {what}")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source} has settings this version does not know: "
                          f"{', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _is_number(value) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


@dataclass(frozen=True)
class SegmenterConfig:
    """Architecture and weight sources of a `VPDSegmenter`.

    Args:
        preset: the model family, a name registered with `models.register_preset` ("vpd": SD
            v1.5 sizes; "tiny"); the preset supplies every fact the config leaves to it.
        token_length: CLIP tokens per sentence, start/end included; also the number of attention
            maps appended to c2 and c3, so it fixes the decoder's input widths (RefCOCO/+: 40,
            RefCOCOg: 77 in VPD).
        img_size: the square input resolution the model is trained and evaluated at (VPD: 512).
        attn_grad: the cross-attention maps fed to the decoder carry gradient (VPD: no).
        decoder_hidden: width of the decoder's fusion blocks; None = the preset's (vpd: 640).
        sd_path: where the pretrained parts come from (vpd: Stable Diffusion v1.5, a diffusers
            folder or an LDM checkpoint file); None: the preset's default path, or none for presets
            whose parts ship with the repository (tiny).
        clip_path: a transformers CLIP folder replacing the text encoder inside sd_path.
        pad_token_id: id the tokenizer pads sentences with; None = the preset's (vpd: CLIP's
            end-of-text).
        no_target_area: `predict` answers "no target" (an empty mask) when the mask covers at most
            this fraction of the image; 0 = only an empty mask does (VPD; the classic datasets).
            For expressions that may refer to nothing (gRefCOCO): bench/no_target_rule.py.
        loss: the training loss (`LossConfig`; a dict of its fields is accepted); VPD's
            class-weighted cross-entropy by default.
    """

    preset: str = "vpd"
    token_length: int = 77
    img_size: int = 512
    attn_grad: bool = False
    decoder_hidden: int | None = None
    sd_path: str | None = None
    clip_path: str | None = None
    pad_token_id: int | None = None
    no_target_area: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self):
        if not isinstance(self.preset, str) or not self.preset:
            raise ConfigError(f"preset must be a model name such as 'vpd', got {self.preset!r}")
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in ("decoder_hidden", "pad_token_id"):
                continue  # the preset's
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if (isinstance(self.no_target_area, bool) or not isinstance(self.no_target_area, (int, float))
                or not 0.0 <= self.no_target_area < 1.0):
            raise ConfigError(f"no_target_area must be a fraction in [0, 1), got {self.no_target_area!r}")
        object.__setattr__(self, "no_target_area", float(self.no_target_area))
        if not isinstance(self.attn_grad, bool):
            raise ConfigError(f"attn_grad must be true or false, got {self.attn_grad!r}")
        for name in ("sd_path", "clip_path"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a path or null, got {value!r}")
        if isinstance(self.loss, Mapping):
            object.__setattr__(self, "loss", LossConfig.from_dict(self.loss))
        elif not isinstance(self.loss, LossConfig):
            raise ConfigError(f"loss must be a LossConfig or a dict of its settings, got {self.loss!r}")

    def replace(self, **changes) -> SegmenterConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {**values, "loss": self.loss.to_dict()}

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> SegmenterConfig:
        return _from_dict(cls, values, source, "segmenter settings")

    def save(self, path: str | Path) -> None:
        with atomic_write(path, "w") as handle:
            handle.write(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SegmenterConfig:
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no model config at {path}") from None
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read the model config {path}: {error}") from None
        return cls.from_dict(values, source=str(path))

    def differences(self, other: SegmenterConfig, fields=None) -> list[tuple[str, object, object]]:
        """(field, self's value, other's value) for every field that differs."""
        names = fields or [field.name for field in dataclasses.fields(self)]
        return [(name, getattr(self, name), getattr(other, name)) for name in names
                if getattr(self, name) != getattr(other, name)]

"""The generated datasets ``toy`` and ``gtoy``: coloured shapes with referring expressions, in the
genuine REFER layout, made on first use under the data root and read by the same code as RefCOCO.

    shapes.py       colours, shape kinds (the categories), outlines, the size ladder
    scenes.py       sampling 2-4 objects per image, with confusers
    render.py       drawing a scene, the JPEG settings
    expressions.py  single-object expressions: describe, resolve, render, parse back
    generalized.py  gtoy's expressions of several objects or none
    writer.py       images on every core, then the REFER entries and instances.json
    toy.py, gtoy.py each dataset: its version, parameters, per-image maker and builder
    install.py      atomic install and regeneration; the `Generator` the catalog holds
    captions.py     the images' alt-text (pre-training the tiny preset)
    __main__.py     `python -m refer.toy DATA_ROOT [--dataset gtoy]`: generate, print statistics

Every image is generated from its own ``numpy.random.SeedSequence([seed, split, index])``; the
same parameters give byte-identical ``instances.json`` and refs files (and JPEGs, for a given
Pillow version), whatever the number of processes making the images. A text-blind model that
always picks the largest or the most central object is right for fewer than 60 % of the refs
(``tests/test_toy.py`` checks it).
"""
from .captions import scene_captions
from .expressions import parse_expression, render_expression, resolve_expression
from .generalized import parse_generalized, resolve_generalized
from .gtoy import GTOY, GTOY_DATASET_NAME, build_gtoy_dataset, ensure_gtoy_dataset, gtoy_params
from .install import Generator, install_generated, stored_params
from .shapes import PALETTE, SHAPES
from .toy import (EVAL_IMAGES, SPLITS, TOY, TOY_DATASET_NAME, TRAIN_IMAGES, build_toy_dataset,
                  ensure_toy_dataset, toy_params)

__all__ = ["TOY", "GTOY", "TOY_DATASET_NAME", "GTOY_DATASET_NAME", "TRAIN_IMAGES", "EVAL_IMAGES",
           "SPLITS", "PALETTE", "SHAPES", "Generator", "ensure_toy_dataset", "build_toy_dataset",
           "toy_params", "ensure_gtoy_dataset", "build_gtoy_dataset", "gtoy_params",
           "install_generated", "stored_params", "resolve_expression", "parse_expression",
           "render_expression", "parse_generalized", "resolve_generalized", "scene_captions"]

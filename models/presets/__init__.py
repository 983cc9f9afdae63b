"""The registered model families, one module each; every module in this folder is imported with
`models`, so a new family is one file here that calls `models.register_preset` (README: "Adding a
model")."""

import importlib
import pkgutil

from . import vpd  # noqa: F401  first: the paper's model leads --model's choices
from . import tiny  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

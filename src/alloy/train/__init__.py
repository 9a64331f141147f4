"""Adapting checkpoints: continued pre-training, SFT and distillation on transformers' Trainer.

    import alloy
    alloy.train("recipe.yaml", "out")              # the same as `alloy train recipe.yaml out`

    from alloy.train import schedules, losses       # the pieces, usable with your own Trainer
    schedule = schedules.Rewarm(lr=3e-4, min_lr=3e-5, warmup=100, total=10_000)

Layers (recipe -> data -> objective -> trainer): recipe.py checks the YAML; data.py reads and
tokenises sources (cached); packing.py lays out the rows of every step (packing, mixture weights,
replay); objectives/ compute the losses (losses.py holds the maths); trainer.py is the Trainer
subclass; run.py ties them together and writes the output.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from alloy.train.recipe import Recipe, load_train_recipe
from alloy.train.run import TrainResult, dry_run, train

__all__ = ["Recipe", "TrainResult", "dry_run", "load_train_recipe", "train"]


class _CallableModule(types.ModuleType):
    """Lets `alloy.train(recipe, out)` call `alloy.train.train` (the package is also a module)."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

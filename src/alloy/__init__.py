"""alloy: combine and adapt foundation-model checkpoints.

Plain Hugging Face checkpoints in and out; see `alloy --help` for the command line.
"""

from alloy.errors import AlloyError

__version__ = "0.1.0"

__all__ = ["AlloyError", "Ensemble", "__version__", "train"]


def __getattr__(name: str) -> object:
    # Heavy entry points load on first use, so `import alloy` (and `alloy merge`) stays light.
    if name == "Ensemble":
        from alloy.ensemble import Ensemble

        return Ensemble
    if name == "train":
        # A package that is also callable: alloy.train(recipe, out) runs a training recipe.
        import alloy.train as train

        return train
    raise AttributeError(f"module 'alloy' has no attribute {name!r}")

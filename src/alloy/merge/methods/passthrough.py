"""Passthrough: copy one model's tensor, optionally scaled.

    theta = scale * theta_model

With recipe slices this stacks layers from several models into a deeper one (the "frankenmerge"
layer stacking of mergekit): each output layer is a passthrough of one source layer.

mergekit's passthrough method, https://github.com/arcee-ai/mergekit
"""

from __future__ import annotations

from typing import Annotated

from alloy.merge.blocks import Elementwise
from alloy.merge.registry import merge_method
from alloy.ranges import ANY


@merge_method(
    base="none",
    reference="https://github.com/arcee-ai/mergekit",
    per_model={"scale": 1.0},
    max_models=1,
)
def passthrough(*, scale: Annotated[list[float], ANY]) -> Elementwise:
    """The single model's tensor times `scale`.

    Args:
        scale: the factor the tensor is multiplied by (1 copies it unchanged)
    """
    return Elementwise(lambda block: block.models[0] * scale[0])

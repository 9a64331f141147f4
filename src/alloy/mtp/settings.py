"""The `mtp:` section of a training recipe (objective: mtp) and its checks.

objective: mtp
mtp:
  heads: 3                 # extra heads; head i predicts token t + 1 + i
  weights: [1.0, 0.5, 0.25]  # per extra head (default: 1 each)
  train_trunk: false       # default: only the heads train, the model is unchanged
  next_token_weight: 1.0   # the model's own next-token loss (only with train_trunk)
  sequential: true         # one head's logits alive at a time (recomputed in backward)
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from alloy.io.yamlfile import StrictModel

Issue = tuple[str, str, str | None]
Number = float | int


class MTPEntry(StrictModel):
    heads: int = Field(default=3, ge=1, le=16)
    weights: list[Number] | None = None
    train_trunk: bool = False
    next_token_weight: Number | None = Field(default=None, ge=0)
    sequential: bool = True


def mtp_settings(spec: Any) -> MTPEntry:
    """The recipe's mtp: section, or its defaults."""
    return spec.mtp if spec.mtp is not None else MTPEntry()


def head_weights(settings: MTPEntry) -> list[float]:
    """One loss weight per extra head."""
    if settings.weights is None:
        return [1.0] * settings.heads
    return [float(w) for w in settings.weights]


def mtp_issues(spec: Any) -> list[Issue]:
    """Cross-field problems of a recipe's mtp: section (and of objective: mtp)."""
    if spec.objective != "mtp":
        if spec.mtp is not None:
            return [("mtp", f"{spec.objective} does not use mtp:", "use objective: mtp")]
        return []
    issues: list[Issue] = []
    settings = mtp_settings(spec)
    if spec.model.path is None:
        issues.append(
            ("model", "mtp adds heads to an existing checkpoint", "model: PATH (a model folder)")
        )
    if spec.adapter is not None:
        issues.append(("adapter", "mtp trains its heads in full, not through an adapter", None))
    if settings.weights is not None:
        if len(settings.weights) != settings.heads:
            issues.append(
                (
                    "mtp.weights",
                    f"{len(settings.weights)} weights for {settings.heads} heads",
                    "give one weight per head",
                )
            )
        if any(w < 0 for w in settings.weights):
            issues.append(("mtp.weights", "weights must be >= 0", None))
        elif not any(settings.weights):
            issues.append(("mtp.weights", "every weight is 0: nothing would train", None))
    if settings.next_token_weight is not None and not settings.train_trunk:
        issues.append(
            (
                "mtp.next_token_weight",
                "the next-token head is the frozen model's own",
                "set train_trunk: true, or remove it",
            )
        )
    return issues

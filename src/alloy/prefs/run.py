"""`alloy prefs strength`: score every pair with each model, write the table, summary and plot.

Outputs (OUT, written whole or not at all):
- `strength.jsonl`: one line per pair, in the data's order: `line` (of the data file), `mean`,
  `std`, `flag`, and `differences` (one per model, in the order given);
- `summary.json`: flags counted, quantiles of the mean difference, the models and settings;
- `histogram.png`: the mean differences, stacked by flag (when matplotlib is installed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from alloy.eval.choice import continuation_logprobs, reward_scores
from alloy.eval.data import Preference, jsonl_records
from alloy.prefs.strength import FLAGS, Action, Strength, filter_records, standardize, strength
from alloy.prefs.strength import summary as summarize


def pair_differences(scorer: Any, items: Sequence[Preference], batch_size: int = 8) -> list[float]:
    """score(prompt + chosen) − score(prompt + rejected) per pair: a reward model's rewards, or
    a causal LM's summed log-probabilities of each answer after the prompt."""
    if getattr(scorer, "is_reward_model", False):
        chosen = reward_scores(scorer, [i.prompt + i.chosen for i in items], batch_size)
        rejected = reward_scores(scorer, [i.prompt + i.rejected for i in items], batch_size)
    else:
        pairs = [(i.prompt, i.chosen) for i in items] + [(i.prompt, i.rejected) for i in items]
        flat = continuation_logprobs(scorer, pairs, batch_size)
        chosen, rejected = flat[: len(items)], flat[len(items) :]
    return [c - r for c, r in zip(chosen, rejected, strict=True)]


def data_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) of a preference file already checked by `load_eval_sets`."""
    return jsonl_records(path.read_text(encoding="utf-8"), path, [])


def run_strength(
    data: Path,
    items: Sequence[Preference],
    models: Sequence[str],
    out: str | os.PathLike[str],
    *,
    load: Callable[[str], Any],
    scored: torch.Tensor | None = None,
    band: float = 1.0,
    standardized: bool = False,
    batch_size: int = 8,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> tuple[Strength, dict[str, Any]]:
    """Score `items` (read from `data`) with each model (`load(path)` gives its scorer, one at a
    time, so memory holds one model) and write OUT. Inputs are checked by the caller.

    Args:
        scored: (models, pairs) bool, True where model k scores pair i (the pairs it held out
            of its training); None: every model scores every pair.
    """
    from alloy.io.atomic import AtomicFolder

    differences = torch.full((len(models), len(items)), float("nan"), dtype=torch.float64)
    for k, model in enumerate(models):
        which = list(range(len(items))) if scored is None else scored[k].nonzero()[:, 0].tolist()
        say(f"scoring {len(which)} pairs with {model} ({k + 1}/{len(models)})")
        scorer = load(model)
        values = pair_differences(scorer, [items[i] for i in which], batch_size)
        differences[k, which] = torch.tensor(values, dtype=torch.float64)
        del scorer
    if standardized:
        differences = standardize(differences)
    result = strength(differences, band)
    info = summarize(result, list(models))
    info |= {"data": str(data), "band": band, "standardize": standardized}
    if scored is not None:
        info["scores_per_pair"] = int(scored[:, 0].sum())
    lines = [number for number, _ in data_records(data)]
    with AtomicFolder(out, force=force) as tmp:
        with (tmp / "strength.jsonl").open("w", encoding="utf-8") as f:
            for i, line in enumerate(lines):
                row = {
                    "line": line,
                    "mean": float(result.mean[i]),
                    "std": float(result.std[i]),
                    "flag": result.flags[i],
                    "differences": [None if v != v else v for v in differences[:, i].tolist()],
                }
                f.write(json.dumps(row) + "\n")
        (tmp / "summary.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        histogram(result, tmp / "histogram.png")
    return result, info


def write_filtered(
    data: Path,
    flags: Sequence[Any],
    path: str | os.PathLike[str],
    *,
    mislabelled: Action,
    ambiguous: Action,
) -> dict[str, int]:
    """The data set with mislabelled / ambiguous pairs kept, dropped or flipped, as JSONL."""
    from alloy.io.writable import write_file

    records = [record for _, record in data_records(data)]
    kept, counts = filter_records(records, flags, mislabelled=mislabelled, ambiguous=ambiguous)
    write_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), "--filter")
    return counts | {"written": len(kept)}


def histogram(result: Strength, path: Path) -> bool:
    """Mean differences stacked by flag; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    values = {
        f: [float(m) for m, g in zip(result.mean, result.flags, strict=True) if g == f]
        for f in FLAGS
    }
    fig, ax = plt.subplots(figsize=(6, 3.2))
    colors = {"clean": "#4c72b0", "ambiguous": "#dd8452", "mislabelled": "#c44e52"}
    ax.hist(
        [values[f] for f in FLAGS],
        bins=40,
        stacked=True,
        label=[f"{f} ({len(values[f])})" for f in FLAGS],
        color=[colors[f] for f in FLAGS],
    )
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("mean score difference (chosen − rejected)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

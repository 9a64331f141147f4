"""The learning-rate schedules of `alloy train` on one run, drawn to docs/img/train_schedules.png.

    python experiments/train_schedules.py

Each schedule over 1,000 steps with peak 1e-3 and floor 1e-4 (warm-up 50 steps): cosine; rewarm
(continuing a checkpoint that ended at the floor); warmup-stable-decay with a 1-sqrt decay over
the last 200 steps; the infinite schedule with a cosine and an inverse-square-root cool-down to
5e-4 over 300 steps, constant, and an exponential anneal over the last 150 steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alloy.train.schedules import Constant, Cosine, Infinite, Rewarm, WarmupStableDecay

    total, lr, low = 1000, 1e-3, 1e-4
    schedules = {
        "constant": Constant(lr=lr, warmup=50),
        "cosine": Cosine(lr=lr, total=total, warmup=50, min_lr=low),
        "rewarm": Rewarm(lr=lr, total=total, warmup=50, min_lr=low),
        "wsd (1-sqrt)": WarmupStableDecay(lr=lr, total=total, decay=200, warmup=50, min_lr=low),
        "infinite (cosine)": Infinite(
            lr=lr, constant_lr=5e-4, total=total, warmup=50, cooldown=300, anneal=150, min_lr=low
        ),
        "infinite (inv_sqrt)": Infinite(
            lr=lr,
            constant_lr=5e-4,
            total=total,
            warmup=50,
            cooldown=300,
            anneal=150,
            min_lr=low,
            cooldown_shape="inv_sqrt",
        ),
    }
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, schedule in schedules.items():
        style = "--" if name == "rewarm" else "-"
        ax.plot(range(total), [schedule(s) for s in range(total)], style, label=name, lw=1.3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = ROOT / "docs" / "img" / "train_schedules.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Where an MoE sends given texts: per layer, the share of each text set's tokens that each expert
receives, as a table (markdown, JSON) and a plot.

Shape legend: S text sets, L MoE layers, E experts, K experts per token.

A token's "choice" is its top-1 expert (the largest router logit); `topk` counts all K experts it
is sent to. When a text set is named like an expert (`fiction`, or a file fiction/test.jsonl),
that expert's top-1 share is the set's routing accuracy. The start token of each text is left
out: every text shares it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alloy.errors import CheckpointError


@dataclass
class RoutingReport:
    experts: list[str]
    sets: list[str]
    top1: torch.Tensor  # (S, L, E) share of a set's tokens whose first choice is expert e
    topk: torch.Tensor  # (S, L, E) share of a set's T*K assignments that go to expert e
    tokens: list[int]  # tokens counted per set
    experts_per_token: int

    @property
    def num_layers(self) -> int:
        return int(self.top1.shape[1])

    def expert_of(self, name: str) -> int | None:
        """The expert a text set belongs to: the expert of the same name, else the one named
        like a part of it (data files are named `<folder>/<stem>`, e.g. drama/validation)."""
        if name in self.experts:
            return self.experts.index(name)
        matches = {p for p in name.split("/") if p in self.experts}
        return self.experts.index(matches.pop()) if len(matches) == 1 else None

    def accuracy(self) -> dict[str, list[float]]:
        """Per set that belongs to an expert: that expert's top-1 share in each layer."""
        result = {}
        for s, name in enumerate(self.sets):
            e = self.expert_of(name)
            if e is not None:
                result[name] = [float(v) for v in self.top1[s, :, e]]
        return result

    def to_json(self) -> dict[str, Any]:
        return {
            "experts": self.experts,
            "sets": self.sets,
            "tokens": self.tokens,
            "experts_per_token": self.experts_per_token,
            "top1": [[[round(float(v), 6) for v in row] for row in layer] for layer in self.top1],
            "topk": [[[round(float(v), 6) for v in row] for row in layer] for layer in self.topk],
            "accuracy": self.accuracy(),
        }

    def summary_table(self) -> str:
        """Markdown: for each set and layer, the expert most of its tokens choose, and its share."""
        header = "| text set | tokens | " + " | ".join(f"layer {i}" for i in range(self.num_layers))
        lines = [header + " |", "|---|---:|" + "---|" * self.num_layers]
        for s, name in enumerate(self.sets):
            cells = []
            for layer in range(self.num_layers):
                share, e = self.top1[s, layer].max(dim=-1)
                cells.append(f"{self.experts[int(e)]} {100 * float(share):.0f}%")
            lines.append(f"| {name} | {self.tokens[s]} | " + " | ".join(cells) + " |")
        accuracy = self.accuracy()
        if accuracy:
            lines += [
                "",
                "Routing accuracy (share of a set's tokens whose first choice is its own expert):",
                "",
                "| text set | "
                + " | ".join(f"layer {i}" for i in range(self.num_layers))
                + " | mean |",
                "|---|" + "---:|" * (self.num_layers + 1),
            ]
            for name, values in accuracy.items():
                mean = sum(values) / len(values)
                cells = [f"{100 * v:.1f}%" for v in values] + [f"{100 * mean:.1f}%"]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def layer_tables(self) -> str:
        """Markdown: per layer, every set's top-1 share for every expert."""
        out = []
        for layer in range(self.num_layers):
            out += [f"### Layer {layer}", "", "| text set | " + " | ".join(self.experts) + " |"]
            out.append("|---|" + "---:|" * len(self.experts))
            for s, name in enumerate(self.sets):
                cells = [f"{100 * float(v):.1f}%" for v in self.top1[s, layer]]
                out.append(f"| {name} | " + " | ".join(cells) + " |")
            out.append("")
        return "\n".join(out)

    def markdown(self) -> str:
        return "\n".join(
            [
                "# Routing report",
                "",
                f"First-choice expert of each token, {self.experts_per_token} experts per token.",
                "",
                self.summary_table(),
                "",
                "## Per layer",
                "",
                self.layer_tables(),
            ]
        )


def expert_names(model: str | Path, num_experts: int) -> list[str]:
    """The experts' names from the recipe alloy writes beside the weights, else expert0..."""
    from alloy.io.yamlfile import read_yaml
    from alloy.moe.upcycle import RECIPE_FILE

    default = [f"expert{i}" for i in range(num_experts)]
    path = Path(model) / RECIPE_FILE
    if not path.is_file():
        return default
    raw = read_yaml(path.read_text(encoding="utf-8"), str(path))
    entries = raw.get("experts") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or len(entries) != num_experts:
        return [f"copy{i}" for i in range(num_experts)] if entries is None else default
    names = [e.get("name") or Path(str(e.get("source_model", ""))).name for e in entries]
    return names if len(set(names)) == num_experts else default


@torch.no_grad()
def routing_report(
    model: Any,
    tokenizer: Any,
    texts: Mapping[str, Sequence[str]],
    *,
    experts: Sequence[str] | None = None,
    window: int = 512,
    max_tokens: int | None = None,
) -> RoutingReport:
    """Route every text of every set through `model` (a transformers MoE causal LM) and count.

    Texts longer than `window` tokens are cut into windows of that length; each set stops once
    `max_tokens` of its tokens are counted.
    """
    from alloy.eval.scorer import start_ids

    config = model.config
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    k = config.num_experts_per_tok
    names = list(experts) if experts is not None else [f"expert{i}" for i in range(num_experts)]
    start = start_ids(tokenizer)
    context = getattr(config, "max_position_embeddings", None)
    if context:
        window = min(window, context - len(start))
    device = next(model.parameters()).device
    top1s, topks, counts = [], [], []
    for name, items in texts.items():
        top1: torch.Tensor | None = None
        topk: torch.Tensor | None = None
        count = 0
        for text in items:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            for begin in range(0, max(len(ids), 1), window):
                if max_tokens is not None and count >= max_tokens:
                    break
                chunk = start + ids[begin : begin + window]
                if len(chunk) <= len(start):
                    continue
                out = model(
                    torch.tensor([chunk], device=device),
                    output_router_logits=True,
                    use_cache=False,
                )
                logits = torch.stack(
                    [r.float().reshape(-1, num_experts) for r in out.router_logits]
                )
                logits = logits[:, len(start) :]  # (L, T, E)
                chosen = logits.topk(k, dim=-1).indices  # (L, T, K)
                first = torch.nn.functional.one_hot(chosen[..., 0], num_experts).sum(1)
                every = torch.nn.functional.one_hot(chosen, num_experts).sum((1, 2))
                top1 = first if top1 is None else top1 + first
                topk = every if topk is None else topk + every
                count += logits.shape[1]
        if top1 is None or topk is None:
            raise CheckpointError(f"text set {name!r} has no tokens to route")
        top1s.append(top1.double() / count)
        topks.append(topk.double() / (count * k))
        counts.append(count)
    return RoutingReport(
        experts=names,
        sets=list(texts),
        top1=torch.stack(top1s).float().cpu(),
        topk=torch.stack(topks).float().cpu(),
        tokens=counts,
        experts_per_token=k,
    )


def load_moe(model_dir: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """An MoE folder as (model, tokenizer), fp32, in eval mode; CheckpointError if it is not one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from alloy.eval.scorer import load_pretrained

    config = load_pretrained(Path(model_dir), AutoConfig)
    if not hasattr(config, "num_experts_per_tok"):
        raise CheckpointError(
            f"{model_dir}: a {config.model_type} model has no experts to report on",
        )
    model = load_pretrained(Path(model_dir), AutoModelForCausalLM, dtype=torch.float32)
    tokenizer = load_pretrained(Path(model_dir), AutoTokenizer)
    return model.to(device).eval(), tokenizer


def write_report(report: RoutingReport, folder: Path, stem: str = "routing") -> list[Path]:
    """routing.md, routing.json and routing.png in `folder` (each written whole, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in (
        (".md", report.markdown() + "\n"),
        (".json", json.dumps(report.to_json(), indent=1) + "\n"),
    ):
        path = folder / f"{stem}{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    written.append(plot_report(report, folder / f"{stem}.png"))
    return written


def plot_report(report: RoutingReport, path: Path) -> Path:
    """One heat map per layer: text sets (rows) by experts (columns), top-1 shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.num_layers
    width = max(2.2, 0.55 * len(report.experts) + 1.2)
    fig, axes = plt.subplots(
        1, layers, figsize=(width * layers + 1, 0.45 * len(report.sets) + 1.6), squeeze=False
    )
    image = None
    for layer, ax in enumerate(axes[0]):
        shares = report.top1[:, layer].numpy()
        image = ax.imshow(shares, vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(len(report.experts)), report.experts, rotation=60, fontsize=7)
        ax.set_yticks(range(len(report.sets)), report.sets if layer == 0 else [], fontsize=8)
        for s in range(shares.shape[0]):
            for e in range(shares.shape[1]):
                color = "white" if shares[s, e] > 0.6 else "black"
                ax.text(
                    e,
                    s,
                    f"{100 * shares[s, e]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color=color,
                )
    fig.suptitle(
        "share of each text set's tokens whose first choice is each expert (%)", fontsize=9
    )
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path

"""The docs/results.md sections of experiments/adapters.py, rendered from its saved JSON."""

from __future__ import annotations

from typing import Any

DOMAINS = ["drama", "scripture", "fiction", "technical"]


def _header(payload: dict[str, Any]) -> list[str]:
    return [
        f"`{payload['command']}` ({payload['minutes']:.0f} min; {payload['machine']}).",
        "",
    ]


def section_smollm2(p: dict[str, Any]) -> str:
    ppl, runs = p["perplexity"], p["runs"]
    base = ppl["SmolLM2-135M"]
    off = DOMAINS[1:]

    def mean_off(row: dict[str, float]) -> float:
        return sum(row[d] for d in off) / len(off)

    lines = [
        "## Adapters against full fine-tuning (SmolLM2-135M)",
        "",
        *_header(p),
        f"SmolLM2-135M-Instruct trained on drama for {p['steps']} steps of "
        f"{p['tokens_per_step']:,} tokens by each method at its customary learning rate "
        "(cosine after 3 warm-up steps; none tuned here). Perplexity on the test split, first "
        f"{p['max_tokens']:,} tokens per domain, window 512. Peak memory is the resident set of "
        "the training process; tokens/s counts training tokens over the run's wall time.",
        "",
        "| method | trainable parameters | peak RSS (MB) | tokens/s | drama | off-domain mean "
        "| scripture | fiction | technical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| SmolLM2-135M (start) | | | | {base['drama']:.2f} | {mean_off(base):.2f} | "
        + " | ".join(f"{base[d]:.2f}" for d in off)
        + " |",
    ]
    for name, run in runs.items():
        row = ppl[name]
        share = run["trainable"] / p["parameters"]
        lines.append(
            f"| {name} | {run['trainable']:,} ({share:.2%}) | {run['peak_rss_mb']:,} | "
            f"{run['tokens_per_s']:.0f} | {row['drama']:.2f} | {mean_off(row):.2f} | "
            + " | ".join(f"{row[d]:.2f}" for d in off)
            + " |"
        )
    full = ppl["full fine-tuning"]
    gains, shifts = [], []
    for name in runs:
        row = ppl[name]
        shift = mean_off(row) / mean_off(base) - 1
        shifts.append(f"{name} {shift:+.1%}")
        if name != "full fine-tuning":
            gain = (base["drama"] - row["drama"]) / (base["drama"] - full["drama"])
            gains.append(f"{name} {gain:.0%}")
    peaks = {name: run["peak_rss_mb"] for name, run in runs.items()}
    lightest = min(peaks, key=peaks.__getitem__)
    saved = 1 - peaks[lightest] / peaks["full fine-tuning"]
    lines += [
        "",
        "Seen: share of full fine-tuning's drama gain (perplexity drop) reached: "
        + "; ".join(gains)
        + ". Change of the off-domain mean perplexity from the start: "
        + "; ".join(shifts)
        + (
            " (no forgetting at this length: every method lowers the other domains too)."
            if all(mean_off(ppl[name]) <= mean_off(base) for name in runs)
            else "."
        )
        + f" The lightest run ({lightest}) peaks only {saved:.0%} below full fine-tuning, though "
        f"AdamW's two fp32 moments for all {p['parameters'] / 1e6:.1f}M parameters alone take "
        f"{8 * p['parameters'] / 2**30:.1f} GiB: at this size and {p['tokens_per_step']:,} "
        "tokens a step, adapters save far less resident memory than their share of trainable "
        "parameters suggests.",
    ]
    return "\n".join(lines)


def section_experts(p: dict[str, Any]) -> str:
    ppl = p["perplexity"]
    base = ppl["small base"]

    def gap(row: dict[str, float], kind: str) -> str:
        shares = []
        for d in DOMAINS:
            own = ppl[f"{kind} expert {d}"][d]
            shares.append((base[d] - row[d]) / (base[d] - own) if base[d] != own else 0.0)
        return ", ".join(f"{s:.0%}" for s in shares)

    lines = [
        "## LoRA experts: merged exactly, with TIES, and upcycled into an MoE",
        "",
        *_header(p),
        f"The `{p['preset']}` preset's small base and its four domain experts (full "
        "fine-tunes, the lab's own recipes) against LoRA experts trained by the same recipes "
        f"with an `adapter:` (rank 16, α 32, peak LR ×{p['lora_lr_multiplier']:g}): on every "
        "linear layer (LoRA) or on the MLPs only (MLP-LoRA). LoRA merges are exact "
        "(`alloy lora merge --method linear|ties --fold`); the MoE routes with `hidden` over 16 "
        "training documents per domain; the MLP-LoRA MoE takes its experts as `BASE+ADAPTER`. "
        f"Perplexity on the test split, first {p['max_tokens']:,} tokens per domain.",
        "",
        "| model | trainable | " + " | ".join(DOMAINS) + " | mean |",
        "|---|---:|" + "---:|" * (len(DOMAINS) + 1),
    ]
    for name, row in ppl.items():
        run = p["runs"].get(name.replace(" expert", ""))
        trainable = f"{run['trainable']:,}" if run else ""
        if name.startswith("full expert ") and "parameters" in p:
            trainable = f"all {p['parameters']:,}"
        mean = sum(row[d] for d in DOMAINS) / len(DOMAINS)
        lines.append(
            f"| {name} | {trainable} | "
            + " | ".join(f"{row[d]:.1f}" for d in DOMAINS)
            + f" | {mean:.1f} |"
        )
    moe_full = ppl["MoE of full experts, hidden, top-2"]
    moe_lora = ppl["MoE of MLP-LoRA experts, hidden, top-2"]
    lines += [
        "",
        "Share of each domain's gap between the base and its own expert that the MoE closes "
        f"({', '.join(DOMAINS)}): MoE of the full fine-tunes {gap(moe_full, 'full')}; MoE of "
        f"the MLP-LoRA experts {gap(moe_lora, 'MLP-LoRA')}.",
        "",
        "Seen: " + _moe_reading(ppl, moe_full, moe_lora),
    ]
    return "\n".join(lines)


def _moe_reading(
    ppl: dict[str, dict[str, float]], moe_full: dict[str, float], moe_lora: dict[str, float]
) -> str:
    """What the MoE rows say, in absolute terms as well as in shares of each expert's gap."""
    lower = [d for d in DOMAINS if moe_lora[d] < moe_full[d]]
    own = {kind: [ppl[f"{kind} expert {d}"][d] for d in DOMAINS] for kind in ("full", "MLP-LoRA")}
    base = [ppl["small base"][d] for d in DOMAINS]
    gain = {
        k: sum(b - o for b, o in zip(base, v, strict=True)) / len(DOMAINS) for k, v in own.items()
    }
    mean = {
        k: sum(row[d] for d in DOMAINS) / len(DOMAINS)
        for k, row in (("full", moe_full), ("lora", moe_lora))
    }
    return (
        "the shares differ because the experts do: an MLP-LoRA expert carries its whole "
        "difference from the base in its MLPs, which an MoE keeps, while a full fine-tune's lies "
        "mostly elsewhere; but it also learns less (own-domain perplexity "
        f"{gain['MLP-LoRA']:.1f} below the base on average, against {gain['full']:.1f} for the "
        "full fine-tunes). In absolute terms the MoE of MLP-LoRA experts is lower than the MoE of "
        f"full fine-tunes on {len(lower)} of {len(DOMAINS)} domains (mean {mean['lora']:.1f} "
        f"against {mean['full']:.1f}); {_versus_experts(ppl, moe_lora)}."
    )


def _versus_experts(ppl: dict[str, dict[str, float]], moe: dict[str, float]) -> str:
    above = [d for d in DOMAINS if moe[d] > ppl[f"full expert {d}"][d]]
    return (
        f"it stays above the full expert's own-domain perplexity on {len(above)} of "
        f"{len(DOMAINS)} domains"
    )

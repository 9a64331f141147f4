"""Self-speculative decoding with MTP heads against plain greedy decoding of the same model, and
the training memory of sequential (recomputed) heads against the naive way.

    OMP_NUM_THREADS=1 python benchmarks/mtp/bench.py        # both parts, writes the section
    python benchmarks/mtp/bench.py --render                  # the section from results.json

The heads are those `experiments/mtp.py` trained (trunk frozen; runs/lab/experiments/mtp/):
the lab small base (Llama, d=192, 4 layers, 8,192-token vocabulary) and SmolLM2-135M-Instruct
(d=576, 30 layers, 49,152-token vocabulary), fp32 on the CPU at one thread.

- **decoding**: new tokens per second over validation prompts (32 tokens each, BOS first), one
  prompt at a time, for transformers' `generate(do_sample=False)`, alloy's plain greedy loop
  (`alloy.mtp.speculative.greedy`: one forward per token through a DynamicCache) and
  speculative greedy with 1 and 3 heads drafting. Every contender's tokens are checked equal to
  plain greedy's. Median of `--runs` runs, contenders interleaved run by run; the speed-up is
  against alloy's plain greedy loop (the same forward code without drafting) and against
  `generate`.
- **memory**: one training step's forward + backward of the mtp objective (3 heads, trunk
  frozen) on a batch of lab text, each way in its own process: the peak resident memory during
  the step above the resident memory before it (sampled every millisecond from /proc), the
  bytes autograd saved for the backward pass (exact), and the step's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

from common import machine, quiet, replace_section  # noqa: E402

MODELS = {"lab": "lab small base", "smollm2": "SmolLM2-135M-Instruct"}
RESULTS = Path(__file__).with_name("results.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompts", type=int, nargs=2, default=[8, 3], help="lab, smollm2")
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[48, 32], help="lab, smollm2")
    parser.add_argument("--batch", type=int, nargs=2, default=[8, 4], help="memory: rows")
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args, *args.memory_child)))
        return
    if args.render:
        payload = json.loads(RESULTS.read_text())
    else:
        quiet()
        import torch

        payload = {"machine": machine(), "threads": torch.get_num_threads(), "decode": {}}
        payload["memory"] = {}
        for i, key in enumerate(MODELS):
            payload["memory"][key] = {
                mode: memory(key, mode, args.batch[i]) for mode in ("naive", "sequential")
            }
            print(json.dumps(payload["memory"][key]))
        for i, key in enumerate(MODELS):
            payload["decode"][key] = decode(args, key, args.prompts[i], args.new_tokens[i])
            print(json.dumps(payload["decode"][key]["median"]))
        if not args.no_write:
            RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    if not args.no_write:
        replace_section(ROOT / "docs" / "benchmarks.md", "mtp", section(payload))


def folder(root: Path, key: str) -> Path:
    path = root / "experiments" / "mtp" / key
    if not (path / "mtp_heads.safetensors").is_file():
        raise SystemExit(f"{path}: no trained heads; run experiments/mtp.py first")
    return path


def decode(args: argparse.Namespace, key: str, count: int, new_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alloy.mtp.cli import eos_ids
    from alloy.mtp.heads import load_heads
    from alloy.mtp.speculative import greedy, speculative_greedy
    from mtp import validation_windows

    path = folder(args.root, key)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    heads = load_heads(model, path)
    eos = eos_ids(model, tokenizer)
    prompts = validation_windows(tokenizer, args.root, count, 32)

    def hf(prompt: list[int]) -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=new_tokens,
                eos_token_id=sorted(eos) or None,
                pad_token_id=tokenizer.pad_token_id,
            )
        return out[0, len(prompt) :].tolist()

    contenders: dict[str, Any] = {
        "generate": hf,
        "greedy": lambda p: greedy(model, p, max_new_tokens=new_tokens, eos=eos),
        "speculative_1": lambda p: speculative_greedy(
            model, heads, p, max_new_tokens=new_tokens, eos=eos, draft=1
        ),
        "speculative_3": lambda p: speculative_greedy(
            model, heads, p, max_new_tokens=new_tokens, eos=eos, draft=3
        ),
    }
    speeds: dict[str, list[float]] = {name: [] for name in contenders}
    outputs: dict[str, list[list[int]]] = {}
    stats: dict[str, dict[str, float]] = {}
    for _ in range(args.runs):
        for name, run in contenders.items():
            tokens, results = 0, []
            started = time.perf_counter()
            for prompt in prompts:
                results.append(run(prompt))
            seconds = time.perf_counter() - started
            ids = [r if isinstance(r, list) else r.tokens for r in results]
            tokens = sum(len(t) for t in ids)
            speeds[name].append(tokens / seconds)
            outputs[name] = ids
            if name.startswith("speculative"):
                steps = [a for r in results for a in r.accepted]
                stats[name] = {
                    "accepted_per_step": sum(steps) / max(1, len(steps)),
                    "tokens_per_forward": tokens / sum(r.forwards for r in results),
                }
    exact = {name: outputs[name] == outputs["greedy"] for name in contenders}
    median = {name: statistics.median(v) for name, v in speeds.items()}
    return {
        "name": MODELS[key],
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "tokens_per_s": speeds,
        "median": median,
        "speculative": stats,
        "exact": exact,
    }


def memory(key: str, mode: str, rows: int) -> dict[str, Any]:
    """One step in a fresh process (so one mode's allocations never serve the other's)."""
    command = [sys.executable, __file__, "--memory-child", key, mode, str(rows)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss() -> int:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def memory_child(args: argparse.Namespace, key: str, mode: str, rows: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alloy.mtp.heads import ATTRIBUTE, MTPHeads
    from alloy.train.objectives.mtp import MultiToken
    from mtp import validation_windows

    quiet()
    path = folder(args.root, key)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    setattr(model, ATTRIBUTE, MTPHeads.from_model(model, 3))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(validation_windows(tokenizer, args.root, int(rows), 256))  # (B, 256)
    batch = {"input_ids": ids, "labels": ids.clone()}
    objective = MultiToken([1.0, 1.0, 1.0], None, sequential=mode == "sequential")
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = 1
        return t

    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    before = _rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = objective.loss(model, batch).total
    loss.backward()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {
        "mode": mode,
        "rows": int(rows),
        "sequence_length": 256,
        "vocab": int(model.config.vocab_size),
        "peak_above_start_mib": (max(peak[0], _rss()) - before) / 2**20,
        "saved_for_backward_mib": sum(n for _, n in saved) / 2**20,
        "step_s": seconds,
    }


def section(payload: dict[str, Any]) -> str:
    lines = [
        "## Multi-token heads: self-speculative decoding and training memory (`mtp`)",
        "",
        "Regenerate: `OMP_NUM_THREADS=1 python benchmarks/mtp/bench.py` (after "
        "`experiments/mtp.py`, whose trained heads it uses); `--render` rewrites this section "
        "from `benchmarks/mtp/results.json`.",
        "",
        f"Machine: {payload['machine']}; {payload['threads']} thread(s); a CPU shared with "
        "other jobs while it ran, so single runs vary.",
        "",
        "Decoding: new tokens per second, one prompt at a time, median of the runs; speed-up "
        "against alloy's plain greedy loop (the same forward code, no drafting) and against "
        "transformers' `generate`. Exact: the same tokens as plain greedy for every prompt.",
        "",
        "| model | prompts x new tokens | contender | tokens/s | speed-up vs greedy | "
        "vs generate | accepted / step | tokens / forward | exact |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for result in payload["decode"].values():
        median = result["median"]
        for name, speed in median.items():
            extra = result["speculative"].get(name)
            accepted = f"{extra['accepted_per_step']:.2f}" if extra else "-"
            per_forward = f"{extra['tokens_per_forward']:.2f}" if extra else "1.00"
            lines.append(
                f"| {result['name']} | {result['prompts']} x {result['new_tokens']} | {name} | "
                f"{speed:.1f} | {speed / median['greedy']:.2f}x | "
                f"{speed / median['generate']:.2f}x | {accepted} | {per_forward} | "
                f"{'yes' if result['exact'][name] else 'NO'} |"
            )
    lines += [
        "",
        "Training memory: one forward + backward of the objective with 3 heads, trunk frozen, "
        "rows of 256 tokens, each way in a fresh process.",
        "",
        "| model | rows | heads computed | peak RSS above start (MiB) | saved for backward "
        "(MiB) | step (s) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for key, modes in payload["memory"].items():
        for mode, m in modes.items():
            lines.append(
                f"| {MODELS[key]} | {m['rows']} | {mode} | {m['peak_above_start_mib']:.0f} | "
                f"{m['saved_for_backward_mib']:.1f} | {m['step_s']:.2f} |"
            )
    lines += ["", *findings(payload)]
    return "\n".join(lines)


def findings(payload: dict[str, Any]) -> list[str]:
    out = []
    for result in payload["decode"].values():
        median = result["median"]
        best = max(result["speculative"], key=lambda name: median[name])
        out.append(
            f"- {result['name']}: the best speculative setting ({best}) ran at "
            f"{median[best] / median['greedy']:.2f}x alloy's plain greedy loop and "
            f"{median[best] / median['generate']:.2f}x `generate`, with "
            f"{result['speculative'][best]['tokens_per_forward']:.2f} tokens per model forward."
        )
    for key, modes in payload["memory"].items():
        naive, sequential = modes["naive"], modes["sequential"]
        out.append(
            f"- {MODELS[key]}: sequential heads peaked "
            f"{naive['peak_above_start_mib'] - sequential['peak_above_start_mib']:.0f} MiB lower "
            f"({sequential['peak_above_start_mib']:.0f} vs {naive['peak_above_start_mib']:.0f} "
            f"MiB) and saved {sequential['saved_for_backward_mib']:.1f} MiB for backward "
            f"instead of {naive['saved_for_backward_mib']:.1f}, for "
            f"{sequential['step_s'] / naive['step_s']:.2f}x the step time (each head "
            "recomputed once in the backward pass)."
        )
    return out


if __name__ == "__main__":
    main()

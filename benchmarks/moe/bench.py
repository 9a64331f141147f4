"""Time alloy's `SparseMoE` against transformers' Mixtral MoE block, same weights, on CPU.

Contenders, all holding the same router and expert weights (alloy's, copied into the others):

- alloy: `SparseMoE(H, I, E, top_k=K)`, routing "topk" (its router runs in fp32, it computes its
  load-balancing and z losses on every forward, and its experts run as two grouped matmuls over
  the assignments sorted by expert);
- grouped_mm: transformers' `MixtralSparseMoeBlock` with `experts_implementation="grouped_mm"`
  (also sorted by expert, `torch.nn.functional.grouped_mm`; what a Mixtral model built through
  `PreTrainedModel` gets by default);
- eager: the same block with `experts_implementation="eager"` (the original loop over the
  experts that have tokens: `torch.where`, two linears, `index_add_`);
- batched_mm: the same block with `experts_implementation="batched_mm"` (gathers a copy of the
  expert weights for every (token, expert) assignment, then `bmm`): only where that copy fits in
  `--batched-mm-gib`, i.e. decode-sized token counts.

How transformers selects it: `MixtralExperts` is decorated with `@use_experts_implementation`,
whose forward looks up `self.config._experts_implementation` on every call in
`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS` ("grouped_mm", "batched_mm", ...; "eager"
is no entry there: it falls back to the class's own loop). A config takes it as
`MixtralConfig(experts_implementation=...)` (or by assigning `config._experts_implementation`).
On a bare block built from a config without it the attribute stays None, which runs the eager
loop (with a warning); only `PreTrainedModel.__init__` (and so `from_pretrained`) turns None into
"grouped_mm". So every block here gets its implementation explicitly, and before timing the
harness checks which one ran: it counts calls to the registered experts functions and records the
aten ops of one forward (`_grouped_mm` for alloy and grouped_mm, and not transformers' per-expert
fallback op; `bmm` for batched_mm; neither for eager). It also checks that outputs agree: fp32:
max |diff| <= 1e-5 of max |output| against alloy, and for the backward every gradient (input,
router, gate_up_proj, down_proj) within 1e-4; bf16: each output against alloy's layer run in fp32
on the same rounded weights, per token within 2e-2 (relative), except on the tokens Mixtral's
router sends to other experts: it computes its logits in bf16 and so breaks near ties differently
from an fp32 router (alloy's); those are counted (at most 10% allowed).

Timed per configuration (shape, token count T = batch x sequence, dtype): the forward under
`torch.no_grad`, and forward + backward (loss = out.float().square().mean(), gradients for the
input and the weights, set to None between runs, not timed). `--warmup` interleaved rounds
(default 1), then `--runs` repetitions (default 5) with the contenders interleaved, their order
rotated each repetition; the table shows medians, results.json every run. Target (the MoE issue):
alloy at least at parity with grouped_mm (grouped_mm / alloy >= 1) and at least 3x faster than
eager on CPU.

    python benchmarks/moe/bench.py              # writes results.json and the docs section
    python benchmarks/moe/bench.py --quick      # < 1 minute smoke run, prints only
    python benchmarks/moe/bench.py --no-write --shapes small --tokens 512 --runs 3
    python benchmarks/moe/bench.py --from-json  # re-render the docs section from results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import transformers  # noqa: E402
from common import (  # type: ignore[import-not-found,unused-ignore]  # noqa: E402
    machine,
    quiet,
    replace_section,
)
from transformers import MixtralConfig  # noqa: E402
from transformers.integrations import moe as hf_moe  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402

from alloy.moe import SparseMoE  # noqa: E402

# name: (H, I, E, K)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "small": (576, 1536, 8, 2),  # SmolLM2-135M-sized experts, 8 of them, top-2
    "mixtral/4": (1024, 2816, 8, 2),  # Mixtral-8x7B's layout, scaled down (4096, 14336 there)
    # fine-grained: OLMoE-1B-7B's 64 experts top-8 (H 2048, I 1024 there), a quarter the width
    "olmoe/4": (512, 256, 64, 8),
}
HF_IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")
PASSES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FP32_OUT_TOL, FP32_GRAD_TOL, BF16_TOL, MAX_REROUTED = 1e-5, 1e-4, 2e-2, 0.1
GRADS = ("input", "router", "gate_up_proj", "down_proj")
# aten/custom ops that show which experts kernel ran
MARKER_OPS = ("aten._grouped_mm", "aten.bmm", "transformers.grouped_mm_fallback")
EXPECTED_OPS = {
    "alloy": {"aten._grouped_mm"},
    "grouped_mm": {"aten._grouped_mm"},
    "eager": set(),
    "batched_mm": {"aten.bmm"},
}
SMOKE = {"shapes": ["small"], "tokens": [16, 512], "runs": 3}


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten (and custom) op that runs under it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_experts_functions() -> Iterator[Counter[str]]:
    """Count calls to transformers' registered experts functions (grouped_mm, batched_mm, ...)
    while inside; "eager" is no registered function, it is the experts' own forward."""
    calls: Counter[str] = Counter()
    interface = hf_moe.ALL_EXPERTS_FUNCTIONS
    names = list(interface.keys())

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in names:
        interface[name] = counted(name, interface[name])  # a local override of the instance
    try:
        yield calls
    finally:
        for name in names:
            del interface[name]  # back to the global mapping


def build(
    shape: tuple[int, int, int, int], dtype: torch.dtype, seed: int = 0
) -> dict[str, nn.Module]:
    """alloy's layer and one Mixtral block per experts implementation, all with alloy's weights."""
    hidden, inter, experts, top_k = shape
    torch.manual_seed(seed)
    alloy = SparseMoE(hidden, inter, experts, top_k=top_k)
    modules: dict[str, nn.Module] = {"alloy": alloy.to(dtype)}
    for impl in HF_IMPLEMENTATIONS:
        options: dict[str, Any] = {"experts_implementation": impl}  # a PreTrainedConfig kwarg
        config = MixtralConfig(
            hidden_size=hidden,
            intermediate_size=inter,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            **options,
        )
        block = MixtralSparseMoeBlock(config).to(dtype)
        experts_module: Any = block.experts
        assert experts_module.config._experts_implementation == impl
        with torch.no_grad():
            block.gate.weight.copy_(alloy.router.weight)
            block.experts.gate_up_proj.copy_(alloy.gate_up_proj)
            block.experts.down_proj.copy_(alloy.down_proj)
        modules[impl] = block
    return modules


def weights(name: str, module: nn.Module) -> list[torch.Tensor]:
    """Router, gate_up_proj, down_proj of a contender, in that order."""
    if name == "alloy":
        assert isinstance(module, SparseMoE)
        return [module.router.weight, module.gate_up_proj, module.down_proj]
    assert isinstance(module, MixtralSparseMoeBlock)
    return [module.gate.weight, module.experts.gate_up_proj, module.experts.down_proj]


def batched_mm_gib(shape: tuple[int, int, int, int], tokens: int, dtype: torch.dtype) -> float:
    """GiB of expert weights batched_mm gathers per forward: a 3I x H copy per assignment."""
    hidden, inter, _, top_k = shape
    return tokens * top_k * 3 * inter * hidden * dtype.itemsize / 2**30


def run_once(module: nn.Module, x: torch.Tensor, backward: bool) -> torch.Tensor:
    """One forward (no grad), or one forward + backward on fresh gradients (returns the output)."""
    if not backward:
        with torch.no_grad():
            return module(x)
    out = module(x)
    out.float().square().mean().backward()
    return out


def fresh(module: nn.Module, x: torch.Tensor) -> None:
    """Drop the gradients of the module's weights and of the input."""
    module.zero_grad(set_to_none=True)
    x.grad = None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check_dispatch(modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, Any]:
    """Run one forward of each contender; fail unless the expected experts kernel ran."""
    found: dict[str, Any] = {}
    for name, module in modules.items():
        with counting_experts_functions() as calls, OpRecorder() as recorder, torch.no_grad():
            module(x)
        ops = sorted(op for op in recorder.ops if op in MARKER_OPS)
        dispatched = sorted(calls)
        expected_calls = [] if name in ("alloy", "eager") else [name]
        if dispatched != expected_calls or set(ops) != EXPECTED_OPS[name]:
            raise AssertionError(
                f"{name}: expected experts functions {expected_calls} and ops "
                f"{sorted(EXPECTED_OPS[name])}, got {dispatched} and {ops}"
            )
        found[name] = {"experts_functions": dispatched, "marker_ops": ops}
    return found


def check_agreement(
    modules: dict[str, nn.Module], x: torch.Tensor, dtype: torch.dtype, backward: bool
) -> dict[str, dict[str, float]]:
    """Fail unless every contender matches alloy (outputs, and gradients with `backward`)."""
    if dtype != torch.float32:
        return check_low_precision(modules, x)
    results: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for name, module in modules.items():
        inputs = x.detach().clone().requires_grad_(backward)
        fresh(module, inputs)
        out = run_once(module, inputs, backward)
        raw = [inputs.grad, *(w.grad for w in weights(name, module))] if backward else []
        results[name] = (out.detach(), [g.detach() for g in raw if g is not None])
        fresh(module, inputs)
    want_out, want_grads = results["alloy"]
    errors: dict[str, dict[str, float]] = {}
    for name, (out, grads) in results.items():
        error = {"output": rel(out, want_out)}
        if error["output"] > FP32_OUT_TOL:
            raise AssertionError(f"{name}: output differs from alloy's by {error['output']:.2e}")
        if len(grads) != len(want_grads):
            raise AssertionError(f"{name}: {len(grads)} gradients, alloy has {len(want_grads)}")
        for label, grad, want in zip(GRADS, grads, want_grads, strict=False):
            error[label] = rel(grad, want)
            if error[label] > FP32_GRAD_TOL:
                raise AssertionError(f"{name}: gradient of {label} differs by {error[label]:.2e}")
        errors[name] = error
    return errors


def check_low_precision(
    modules: dict[str, nn.Module], x: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Each contender's low-precision output against alloy's fp32 layer on the same rounded
    weights and input, token by token: within BF16_TOL (relative) on every token that the
    contender routes to the same experts as the fp32 router. Mixtral's router computes its logits
    in the layer's dtype, so on near ties it picks other experts for a few tokens (alloy's runs
    in fp32); those tokens are counted, and may be at most MAX_REROUTED of them."""
    reference = fp32_copy(modules["alloy"])
    tokens = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        want = reference(x.float()).reshape(tokens.shape)
        want_experts = reference.route(tokens.float()).experts.sort(-1).values
    errors: dict[str, dict[str, float]] = {}
    for name, module in modules.items():
        with torch.no_grad():
            got = module(x).float().reshape(tokens.shape)
            if isinstance(module, MixtralSparseMoeBlock):
                experts = module.gate(tokens)[2].sort(-1).values
                rerouted = (experts != want_experts).any(-1)
            else:
                rerouted = torch.zeros(len(tokens), dtype=torch.bool)
        error = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)
        same = error[~rerouted]
        worst = same.max().item() if same.numel() else float("inf")
        share = rerouted.float().mean().item()
        if worst > BF16_TOL or share > MAX_REROUTED:
            raise AssertionError(
                f"{name} {x.dtype}: max error {worst:.2e} on tokens routed as in fp32, "
                f"{share:.1%} of tokens rerouted"
            )
        errors[name] = {
            "median_token": error.median().item(),
            "max_token_same_routing": worst,
            "rerouted_share": share,
        }
    return errors


def fp32_copy(alloy: nn.Module) -> SparseMoE:
    """An fp32 copy of alloy's (low-precision) layer, with the same rounded weights."""
    assert isinstance(alloy, SparseMoE)
    hidden, experts = alloy.router.in_features, alloy.num_experts
    copy = SparseMoE(hidden, alloy.down_proj.shape[-1], experts, top_k=alloy.top_k)
    copy.load_state_dict({k: v.float() for k, v in alloy.state_dict().items()})
    return copy


def time_contenders(
    modules: dict[str, nn.Module], x: torch.Tensor, backward: bool, runs: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds of each contender: `warmup` untimed rounds, then `runs` timed ones, the
    contenders interleaved in an order rotated every round (so that a slow neighbour, e.g. one
    that just freed gigabytes, does not always precede the same contender)."""
    names = list(modules)
    inputs = x.detach().clone().requires_grad_(backward)
    ms: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + runs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            module = modules[name]
            fresh(module, inputs)
            start = time.perf_counter()
            run_once(module, inputs, backward)
            if round_ >= warmup:
                ms[name].append(1e3 * (time.perf_counter() - start))
            fresh(module, inputs)
    return ms


def bench(
    shape_name: str, tokens: int, dtype_name: str, passes: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    modules = build(shape, dtype)
    skipped = {}
    gathered = batched_mm_gib(shape, tokens, dtype)
    if gathered > args.batched_mm_gib:
        skipped["batched_mm"] = f"would gather {gathered:.1f} GiB of expert weights per forward"
        del modules["batched_mm"]
    torch.manual_seed(1)
    x = torch.randn(1, tokens, shape[0]).to(dtype)
    dispatch = check_dispatch(modules, x)
    rows = []
    for pass_name in passes:
        backward = pass_name == "forward+backward"
        for module in modules.values():
            module.train(backward)
        errors = check_agreement(modules, x, dtype, backward)
        runs_ms = time_contenders(modules, x, backward, args.runs, args.warmup)
        ms = {name: statistics.median(values) for name, values in runs_ms.items()}
        ratios = {f"{name}/alloy": ms[name] / ms["alloy"] for name in ms if name != "alloy"}
        row = {
            "shape": shape_name,
            "hidden": shape[0],
            "intermediate": shape[1],
            "experts": shape[2],
            "top_k": shape[3],
            "tokens": tokens,
            "dtype": dtype_name,
            "pass": pass_name,
            "ms": ms,
            "ratios": ratios,
            "runs_ms": runs_ms,
            "errors": errors,
            "dispatch": dispatch,
            "skipped": skipped,
        }
        print(
            f"{shape_name} T={tokens} {dtype_name} {pass_name}: "
            + ", ".join(f"{n} {v:.1f} ms" for n, v in ms.items())
            + " | "
            + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()),
            flush=True,
        )
        rows.append(row)
    return rows


def cell(row: dict[str, Any], name: str) -> str:
    return f"{row['ms'][name]:.1f}" if name in row["ms"] else "-"


def ratio(row: dict[str, Any], name: str) -> str:
    value = row["ratios"].get(f"{name}/alloy")
    return "-" if value is None else f"{value:.2f}x"


def span(rows: list[dict[str, Any]], name: str, pass_name: str) -> str:
    """'a-bx': the range of `name`/alloy over the rows of one pass ('' if none)."""
    values = [
        r["ratios"][f"{name}/alloy"]
        for r in rows
        if r["pass"] == pass_name and f"{name}/alloy" in r["ratios"]
    ]
    return f"{min(values):.2f}x to {max(values):.2f}x" if values else ""


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    shapes = {r["shape"]: r for r in rows}
    lines = [
        "## MoE layer: SparseMoE vs transformers' Mixtral experts",
        "",
        "`benchmarks/moe/bench.py`: one MoE feed-forward layer, alloy's `SparseMoE` (routing "
        '"topk") against transformers\' `MixtralSparseMoeBlock` with its experts '
        'implementations "grouped_mm" (the default of a Mixtral model built through '
        '`PreTrainedModel`), "eager" (a loop over the experts) and "batched_mm" (a weight copy per '
        "token and expert, then `bmm`; run only where that copy fits in memory), all holding "
        "the same weights. Before timing, the harness checks that each ran the kernel it names "
        "and that outputs (and, for the backward, gradients) agree with alloy's. Target (the "
        "MoE issue): alloy at least at parity with grouped_mm (grouped_mm / alloy >= 1) and at "
        "least 3x faster than eager on CPU.",
        "",
        f"Machine: {meta['machine']}; transformers {meta['transformers']}; {meta['threads']} "
        f"torch threads; median of {meta['runs']} runs after {meta.get('warmup', 1)} warm-up "
        "round(s), contenders interleaved"
        + (
            f" (1-minute load average {meta['load_average'][0]} before the run, "
            f"{meta['load_average'][1]} after)"
            if "load_average" in meta
            else ""
        )
        + ". Tokens T = batch x sequence (one sequence of T "
        "here). Forward: under `torch.no_grad`; forward+backward: loss = mean of the squared "
        "output, gradients for the input and all weights. Shapes (H hidden, I expert "
        "intermediate, E experts, K per token): "
        + "; ".join(
            f"{name} H={r['hidden']} I={r['intermediate']} E={r['experts']} K={r['top_k']}"
            for name, r in shapes.items()
        )
        + ". Regenerate with:",
        "",
        "```sh",
        meta["command"],
        "```",
        "",
        "| shape | T | dtype | pass | alloy ms | grouped_mm ms | eager ms | batched_mm ms "
        "| grouped_mm / alloy | eager / alloy | batched_mm / alloy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['dtype']} | {r['pass']} | {cell(r, 'alloy')} "
            f"| {cell(r, 'grouped_mm')} | {cell(r, 'eager')} | {cell(r, 'batched_mm')} "
            f"| {ratio(r, 'grouped_mm')} | {ratio(r, 'eager')} | {ratio(r, 'batched_mm')} |"
        )
    summary = "; ".join(
        f"{name} / alloy: "
        + ", ".join(f"{p} {span(rows, name, p)}" for p in PASSES if span(rows, name, p))
        + f" (target >= {target})"
        for name, target in (("grouped_mm", 1), ("eager", 3))
    )
    rerouted = [
        e["rerouted_share"] for r in rows for e in r["errors"].values() if "rerouted_share" in e
    ]
    lines += [
        "",
        f"Ratios above 1 mean alloy is faster. Over these rows, {summary}. batched_mm: `-` "
        f"where its gathered weights would exceed {meta['batched_mm_gib']} GiB."
        + (
            " bfloat16 outputs are checked token by token against alloy's layer in fp32; "
            "Mixtral's router, which computes its logits in bfloat16, sends up to "
            f"{max(rerouted):.1%} of the tokens to other experts (near ties)."
            if rerouted
            else ""
        )
        + " No GPU was available to this run.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 512, 2048])
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES)
    )
    parser.add_argument(
        "--bf16-backward",
        action="store_true",
        help="also time forward+backward in bfloat16 (default: bfloat16 forward only; "
        "bfloat16 is checked on outputs, not gradients)",
    )
    parser.add_argument(
        "--batched-mm-gib",
        type=float,
        default=2.0,
        help="run batched_mm only where its gathered expert weights fit in this many GiB",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: small shape, T 16 and 512, 3 runs; prints"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--from-json", action="store_true", help="rewrite the docs section from results.json"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "moe" / "results.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.json.read_text())
        replace_section(args.markdown, "moe", markdown(**saved))
        return 0
    if args.quick:
        args.shapes, args.tokens, args.runs = SMOKE["shapes"], SMOKE["tokens"], SMOKE["runs"]
        args.no_write = True
    quiet()
    torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for shape in args.shapes:
        for tokens in args.tokens:
            for dtype in args.dtypes:
                passes = list(PASSES)
                if dtype != "float32" and not args.bf16_backward:
                    passes = ["forward"]
                rows += bench(shape, tokens, dtype, passes, args)
    meta = {
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "warmup": args.warmup,
        "batched_mm_gib": args.batched_mm_gib,
        "seconds": round(time.perf_counter() - start, 1),
        # other processes on the machine slow the contenders unevenly: see the raw runs
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "command": "python benchmarks/moe/bench.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    text = markdown(meta, rows)
    print(f"\n{text}\n\n({meta['seconds']} s)")
    if not args.no_write:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        replace_section(args.markdown, "moe", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

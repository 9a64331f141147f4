"""The demo: build (or reuse) the `demo` family, merge its experts, score everything per domain.

This is the README's first command. It shows the product's main loop on real text and real
(small) models: four domain experts fine-tuned from one base are combined by three merge recipes
(uniform soup, task arithmetic, TIES), the fine-tunes of one domain are combined by a greedy soup
(selected on that domain's validation split), the large base is proxy-tuned at decode time by
the small expert / base pair of that domain (an ensemble recipe), the mixture of the small
experts is distilled into the small base with `alloy train` (an ensemble teacher), LoRA
experts are trained on the small base (`alloy train` with an `adapter:`) and merged exactly
(`alloy lora merge`), and the bases, every expert, every merge, the soup, the ensemble, the
distilled model and the adapters are scored on every domain's test split. The table, the
recipes, the raw JSON, a plot and sampled continuations of the ensemble land in `out`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from alloy.ensemble import Ensemble
from alloy.eval import EvalSettings, evaluate, load_eval_sets, load_scorer, markdown_table
from alloy.lab.family import build_family
from alloy.lab.presets import PRESETS, Preset


def demo_recipes(
    family: Path, domains: list[str], size: str = "small"
) -> dict[str, dict[str, Any]]:
    """mergekit-format recipes over the `size` base and its domain experts."""
    base = str(family / size / "base")
    experts = [str(family / size / "experts" / d) for d in domains]
    return {
        "soup": {
            "merge_method": "linear",
            "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts],
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": e, "parameters": {"weight": 1.0, "density": 0.5}} for e in experts
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
    }


def small_base_recipe(
    name: str, objective: str, family: Path, preset: Preset, root: Path, seed: int, **fields: Any
) -> dict[str, Any]:
    """An `alloy train` recipe starting from the small base on the lab corpus under `root`:
    the fields every demo training shares (batch and context of the preset, seed), then
    `fields` (data, schedule, steps, ...), which may override them."""
    return {
        "name": f"demo: {name}",
        "objective": objective,
        "model": str(family / "small" / "base"),
        "lab": str(root),
        "batch_size": preset.batch,
        "sequence_length": preset.seq_len,
        "seed": seed,
        **fields,
    }


def distill_recipe(
    family: Path, domains: list[str], preset: Preset, root: Path, recipes: Path, seed: int
) -> dict[str, Any]:
    """The `alloy train` recipe distilling the linear mixture of the small experts into the
    small base; the teacher's ensemble recipe and this recipe are written to `recipes`."""
    mixture = {
        "rule": "linear",
        "members": [
            {"model": str(family / "small" / "experts" / d), "weight": 1 / len(domains)}
            for d in domains
        ],
    }
    teacher = recipes / "experts-mixture.yaml"
    teacher.write_text(yaml.safe_dump(mixture, sort_keys=False))
    stage = preset.expert["small"]
    recipe = small_base_recipe(
        "the experts' mixture distilled into the small base",
        "distill",
        family,
        preset,
        root,
        seed,
        teacher={"model": str(teacher), "loss": "forward_kl", "alpha": 0.5},
        data=[{"name": d, "corpus": d} for d in domains],
        schedule={"name": "cosine", "lr": stage.lr, "warmup": stage.warmup},
        optimizer={"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.95]},
        max_steps=stage.steps * 2,
    )
    (recipes / "distill-experts.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return recipe


def lora_recipe(family: Path, domain: str, preset: Preset, root: Path, seed: int) -> dict[str, Any]:
    """A LoRA expert of one domain on the small base: the full expert's recipe with an
    `adapter:` (rank 8 on every linear layer) at 5x its peak learning rate."""
    stage = preset.expert["small"]
    return small_base_recipe(
        f"LoRA expert {domain}",
        "causal_lm",
        family,
        preset,
        root,
        seed,
        adapter={"type": "lora", "rank": 8, "alpha": 16},
        data=[{"name": domain, "corpus": domain}],
        schedule={"name": "cosine", "lr": stage.lr * 5, "warmup": stage.warmup},
        optimizer={"name": "adamw", "weight_decay": 0.0, "betas": [0.9, 0.95]},
        max_steps=stage.steps,
    )


def improve_files(corpus: Path, domains: list[str], liked: str, work: Path) -> dict[str, Path]:
    """Preference pairs (a passage of `liked` chosen over one of another domain, no prompt)
    and RAFT prompts (the first words of validation passages of every domain)."""

    def passages(domain: str, split: str, words: int) -> list[str]:
        lines = (corpus / domain / f"{split}.jsonl").read_text().splitlines()
        return [" ".join(json.loads(line)["text"].split()[:words]) for line in lines]

    liked_texts = passages(liked, "train", 40)
    others = [d for d in domains if d != liked]
    pairs = []
    for i in range(96):
        other = passages(others[i % len(others)], "train", 40)
        pair = {"chosen": liked_texts[i % len(liked_texts)], "rejected": other[i % len(other)]}
        pairs.append({"prompt": "", **pair})
    prompts = [{"prompt": text} for d in domains for text in passages(d, "validation", 3)[:8]]
    work.mkdir(parents=True, exist_ok=True)
    files = {"pairs": work / "pairs.jsonl", "prompts": work / "prompts.jsonl"}
    for key, rows in (("pairs", pairs), ("prompts", prompts)):
        files[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def reward_recipe(
    family: Path, pairs: Path, preset: Preset, root: Path, seed: int
) -> dict[str, Any]:
    stage = preset.expert["small"]
    return small_base_recipe(
        "reward model",
        "reward",
        family,
        preset,
        root,
        seed,
        data=[{"name": "pairs", "path": str(pairs), "kind": "preference"}],
        schedule={"name": "cosine", "lr": stage.lr, "warmup": stage.warmup},
        optimizer={"name": "adamw", "weight_decay": 0.0},
        max_steps=40,
        sequence_length=min(64, preset.seq_len),
    )


def raft_recipe(
    family: Path, prompts: Path, reward: Path, preset: Preset, root: Path, seed: int
) -> dict[str, Any]:
    """One RAFT iteration of the small base: 4 samples per prompt, the best by `reward`, SFT."""
    stage = preset.expert["small"]
    return {
        "name": "demo: RAFT",
        "improve": "raft",
        "policy": str(family / "small" / "base"),
        "prompts": str(prompts),
        "iterations": 1,
        "sample": {
            "k": 4,
            "max_new_tokens": min(32, preset.seq_len // 2),
            "temperature": 1.0,
            "batch_size": 32,
        },
        "score": {"reward": [str(reward)]},
        "select": {"top_k": 1},
        "train": {
            "schedule": {"name": "constant", "lr": stage.lr / 10},
            "max_steps": 10,
            "batch_size": preset.batch,
            "sequence_length": min(64, preset.seq_len),
        },
        "lab": str(root),
        "seed": seed,
    }


def mtp_recipe(
    family: Path, domains: list[str], preset: Preset, root: Path, seed: int
) -> dict[str, Any]:
    """Two multi-token-prediction heads trained beside the frozen small base on every domain."""
    stage = preset.expert["small"]
    return small_base_recipe(
        "MTP heads on the small base",
        "mtp",
        family,
        preset,
        root,
        seed,
        mtp={"heads": 2},
        data=[{"name": d, "corpus": d} for d in domains],
        schedule={"name": "cosine", "lr": 2e-3, "warmup": stage.warmup},
        max_steps=stage.steps * 2,
    )


def speculative_report(folder: Path, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """Plain greedy against self-speculative greedy decoding with the heads in `folder`: whether
    every output is the same, drafts accepted per step, and tokens per model forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alloy.eval.scorer import load_pretrained, start_ids
    from alloy.mtp.cli import eos_ids
    from alloy.mtp.heads import load_heads
    from alloy.mtp.speculative import acceptance

    tokenizer = load_pretrained(folder, AutoTokenizer, "model")
    model = load_pretrained(folder, AutoModelForCausalLM, "model").eval()
    ids = [
        start_ids(tokenizer) + list(tokenizer(p, add_special_tokens=False)["input_ids"])
        for p in prompts
    ]
    eos = eos_ids(model, tokenizer)
    result = acceptance(model, load_heads(model, folder), ids, max_new_tokens=new_tokens, eos=eos)
    return {
        "prompts": result["prompts"],
        "identical_to_greedy": result["exact"],
        "accepted_per_step": result["accepted_per_step"],
        "tokens_per_forward": result["tokens_per_forward"],
    }


def dola_samples(model: Path, prompts: list[str], new_tokens: int) -> list[dict[str, Any]]:
    """Greedy continuations of `model` plainly and by DoLa (low layers, repetition penalty 1.2,
    as in the paper), each labelled with its decoder and timed."""
    decoders = {
        "greedy": Ensemble.from_models([model], rule="linear"),
        "dola (layers low, penalty 1.2)": Ensemble.from_recipe(
            {"rule": "dola", "members": [{"model": str(model)}], "layers": "low"}
        ),
    }
    samples = []
    for label, ensemble in decoders.items():
        penalty = 1.2 if ensemble.layers else None
        start = time.perf_counter()
        out = ensemble.generate(prompts, max_new_tokens=new_tokens, repetition_penalty=penalty)
        seconds = time.perf_counter() - start
        samples += [
            {
                "model": str(model.relative_to(model.parents[2])),
                "decoder": label,
                **g.as_dict(),
                "seconds": seconds / len(prompts),
            }
            for g in out
        ]
    return samples


def run_demo(
    root: Path,
    out: Path,
    *,
    preset: str | Preset = "demo",
    seed: int = 0,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the family under `root`, merge and evaluate into `out`; return the results."""
    from alloy.adapters.combine import combine_adapters
    from alloy.improve import improve
    from alloy.io.atomic import AtomicFolder
    from alloy.merge.api import merge
    from alloy.soup import make_soup
    from alloy.train import train

    t0 = time.perf_counter()
    settings = PRESETS[preset] if isinstance(preset, str) and preset in PRESETS else preset
    record = build_family(root, preset, seed=seed, on_event=say)  # validates the preset name
    assert isinstance(settings, Preset)
    family = root / "family" / settings.name
    corpus = root / "corpus"
    domains = [d for d in json.loads((corpus / "manifest.json").read_text())["domains"]]
    timings = {"family_s": time.perf_counter() - t0}

    eval_settings = EvalSettings(
        window=settings.seq_len,
        stride=settings.seq_len // 2,
        batch_size=16,
        max_tokens=settings.eval_tokens,
    )
    with AtomicFolder(out, force=force) as tmp:
        t = time.perf_counter()
        models: dict[str, Path] = {"base": family / "small" / "base"}
        models |= {f"expert:{d}": family / "small" / "experts" / d for d in domains}
        for name, recipe in demo_recipes(family, domains).items():
            (tmp / "recipes").mkdir(exist_ok=True)
            (tmp / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            say(f"merging {name}")
            merge(recipe, tmp / "merges" / name, hash_inputs=False)
            models[f"merge:{name}"] = tmp / "merges" / name
        timings["merge_s"] = time.perf_counter() - t

        # A greedy soup of the fine-tunes of one domain, selected on that domain's validation
        # split (the table below is on the test splits, so the selection does not flatter it).
        t = time.perf_counter()
        domain = settings.soup_domain
        ingredients = sorted((family / "small" / "soup").iterdir())
        ingredients.append(family / "small" / "experts" / domain)
        say(f"greedy soup of {len(ingredients)} {domain} fine-tunes")
        soup = make_soup(
            ingredients,
            [corpus / domain / "validation.jsonl"],
            tmp / "soups" / f"greedy-{domain}",
            settings=eval_settings,
            hash_inputs=False,
        )
        models[f"soup:greedy-{domain}"] = tmp / "soups" / f"greedy-{domain}"
        timings["soup_s"] = time.perf_counter() - t

        # Proxy-tuning: the large base steered by what fine-tuning taught the small model on
        # the soup domain, as an ensemble recipe scored beside the models.
        proxy = {
            "rule": "proxy_tuning",
            "members": [
                {"model": str(family / "large" / "base"), "role": "base"},
                {"model": str(family / "small" / "experts" / domain), "role": "expert"},
                {"model": str(family / "small" / "base"), "role": "anti_expert"},
            ],
            "sampling": {"max_new_tokens": 40, "do_sample": True, "top_p": 0.9, "seed": seed},
        }
        recipe_text = yaml.safe_dump(proxy, sort_keys=False)
        (tmp / "recipes" / f"proxy-{domain}.yaml").write_text(recipe_text)
        models["large base"] = family / "large" / "base"
        scorers: dict[str, Any] = {f"ensemble:proxy-{domain}": Ensemble.from_recipe(proxy)}

        # Distillation with alloy train: the small base learns from the mixture of its four
        # experts (an ensemble teacher) on all four domains, one model instead of a merge.
        t = time.perf_counter()
        say("distilling the mixture of the experts into the small base (alloy train)")
        distilled = tmp / "train" / "distill-experts"
        train(distill_recipe(family, domains, settings, root, tmp / "recipes", seed), distilled)
        models["train:distill-experts"] = distilled
        timings["train_s"] = time.perf_counter() - t

        # Adapters: a LoRA expert per domain (the base stays frozen; each file is a PEFT
        # adapter), scored as BASE+ADAPTER, and their exact uniform merge folded into the base.
        t = time.perf_counter()
        base = family / "small" / "base"
        loras = []
        for d in domains:
            say(f"training a LoRA expert on {d} (alloy train, adapter: lora)")
            recipe = lora_recipe(family, d, settings, root, seed)
            (tmp / "recipes" / f"lora-{d}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            train(recipe, tmp / "adapters" / d)
            loras.append(tmp / "adapters" / d)
            models[f"lora:{d}"] = Path(f"{base}+{tmp / 'adapters' / d}")
        say("merging the LoRA experts exactly (alloy lora merge --method linear --fold)")
        combine_adapters(
            loras, tmp / "merges" / "lora-linear", method="linear", base=base, fold_base=True
        )
        models["merge:lora-linear"] = tmp / "merges" / "lora-linear"
        timings["adapters_s"] = time.perf_counter() - t

        # Self-improvement: a reward model that prefers the soup domain's prose, and one RAFT
        # iteration (alloy improve): the small base's best-of-4 continuations by that reward
        # become its fine-tuning data.
        t = time.perf_counter()
        say(f"reward model preferring {domain} (alloy train, objective: reward)")
        work = tmp / "improve"
        files = improve_files(corpus, domains, domain, work)
        reward = work / f"reward-{domain}"
        train(reward_recipe(family, files["pairs"], settings, root, seed), reward)
        say("RAFT: best of 4 samples by that reward, then SFT (alloy improve)")
        loop = raft_recipe(family, files["prompts"], reward, settings, root, seed)
        (tmp / "recipes" / f"raft-{domain}.yaml").write_text(yaml.safe_dump(loop, sort_keys=False))
        improved = improve(loop, work / f"raft-{domain}", say=lambda m: None)
        iteration = improved["iterations"][0]
        models[f"improve:raft-{domain}"] = Path(iteration["model"])
        timings["improve_s"] = time.perf_counter() - t

        # One model, better: multi-token prediction heads on the small base, used for
        # self-speculative decoding (the same text as greedy, in fewer forwards), and DoLa
        # decoding (contrasting the large base's final layer with an early one).
        t = time.perf_counter()
        prompts = ["It was a", "She said that"]
        say("training 2 multi-token prediction heads on the small base (objective: mtp)")
        recipe = mtp_recipe(family, domains, settings, root, seed)
        (tmp / "recipes" / "mtp-heads.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        train(recipe, tmp / "train" / "mtp-heads")
        speculative = speculative_report(tmp / "train" / "mtp-heads", prompts, new_tokens=40)
        say("DoLa decoding of the large base (rule: dola)")
        dola = dola_samples(family / "large" / "base", prompts, new_tokens=40)
        timings["single_model_s"] = time.perf_counter() - t

        t = time.perf_counter()
        sets = load_eval_sets([corpus / d / "test.jsonl" for d in domains])
        results = {}
        for name in [*models, *scorers]:
            say(f"scoring {name}")
            scorer = scorers[name] if name in scorers else load_scorer(models[name], name=name)
            scores = evaluate(scorer, sets, eval_settings)
            # Columns named by domain: "drama" rather than "drama/validation".
            results[name] = {key.split("/")[0]: value for key, value in scores.items()}
        timings["eval_s"] = time.perf_counter() - t
        samples = [
            {
                "model": f"ensemble:proxy-{domain}",
                "decoder": "proxy-tuning, top-p 0.9",
                **g.as_dict(),
            }
            for g in scorers[f"ensemble:proxy-{domain}"].generate(prompts)
        ]
        (tmp / "samples.jsonl").write_text("".join(json.dumps(g) + "\n" for g in [*samples, *dola]))
        timings["total_s"] = time.perf_counter() - t0

        table = markdown_table(results)
        (tmp / "perplexity.md").write_text(
            f"Per-domain perplexity (test split, first {settings.eval_tokens} tokens per "
            f"domain, window {settings.seq_len}, stride {settings.seq_len // 2}); lower is "
            f"better.\n\n{table}\n"
        )
        payload = {
            "preset": settings.name,
            "seed": seed,
            "settings": eval_settings.__dict__,
            "timings": timings,
            "family": {k: v.get("final_loss") for k, v in record["models"].items()},
            "greedy_soup": [p.name for p in soup.chosen_paths],
            "raft": {
                "reward_before": iteration["score"]["mean"],
                "reward_kept": iteration["runs"][0]["kept_score"],
                "kept": iteration["runs"][0]["kept"],
            },
            "proxy_samples": samples,
            "speculative": speculative,
            "dola_samples": dola,
            "results": results,
        }
        (tmp / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        plot_perplexity(results, domains, tmp / "perplexity.png")
    return payload


def plot_perplexity(results: dict[str, dict[str, Any]], columns: list[str], path: Path) -> bool:
    """Grouped bars of perplexity per domain and model; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(results))
    for i, (model, per_set) in enumerate(results.items()):
        values = [per_set[c]["perplexity"] for c in columns]
        ax.bar([j + i * width for j in range(len(columns))], values, width, label=model)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))])
    ax.set_xticklabels(columns)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

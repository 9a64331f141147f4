"""Sentiment experts and an independent sentiment judge, for DExperts-style steering.

    python experiments/reviews.py --preset experiment

DExperts (Liu et al. 2021, https://arxiv.org/abs/2105.03023) steers a base model at decode time
with `logits = base + alpha * (expert - anti_expert)`. This module builds the two experts from the
lab family's base: one fine-tuned on the fine-food reviews labelled "great" (5 stars), one on
those labelled "other", with the lab's `train_job` (the `alloy train` recipe of the family's
domain experts, the preset's expert stage, no trajectory). It also builds the judge that the
steering experiment scores generations with: a hashed bag-of-words logistic regression that shares
nothing with the language models (no tokenizer, no weights), so steering cannot "fool" it by
exploiting the experts' own quirks.

Outputs: `<root>/family/<preset>/reviews/<size>/{great,other}/`, complete model folders (weights,
config, tokenizer) with `alloy-review-job.json` recording the recipe hash, loss and seconds; a
folder whose recorded hash matches is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import sys
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, quiet

from alloy.errors import CheckpointError, InputError, Problem

LABELS = ("great", "other")
MAJORITY_ACCURACY = 0.658  # share of "great" in test.jsonl: always answering "great"
MARKER = "alloy-review-job.json"
_TOKEN = re.compile(r"[a-z0-9']+|[!?]")  # "!" and "?" carry sentiment; other punctuation not


def read_reviews(path: Path) -> tuple[list[str], list[str]]:
    """Texts and labels of a reviews JSONL file (records `{"text", "label"}`)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [r["text"] for r in records], [r["label"] for r in records]


def expert_paths(root: Path, preset: str, size: str) -> dict[str, Path]:
    """Where the experts of `size` live: `{"great": folder, "other": folder}`."""
    return {label: root / "family" / preset / "reviews" / size / label for label in LABELS}


def train_review_experts(
    root: Path = ROOT / "runs" / "lab",
    preset: str = "experiment",
    sizes: Sequence[str] = ("small",),
    *,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Path]:
    """Fine-tune (or reuse) the "great" and "other" experts of each size from its lab base.

    Returns:
        `{"<size>/<label>": folder}` for every size and label.
    Raises:
        CheckpointError: the base or tokenizer of the family is missing (build it first).
    """
    from transformers import AutoTokenizer

    from alloy.lab.family import Job, train_job
    from alloy.lab.presets import PRESETS

    if preset not in PRESETS:
        raise InputError(
            f"unknown preset {preset!r}", [Problem("preset", f"choose one of {', '.join(PRESETS)}")]
        )
    spec = PRESETS[preset]
    home = root / "family" / preset
    data = root / "corpus" / "tasks" / "reviews" / "train.jsonl"
    bases = {size: home / size / "base" for size in sizes}
    missing = [p for p in [home / "tokenizer" / "tokenizer.json", data] if not p.is_file()]
    missing += [base for base in bases.values() if not (base / "config.json").is_file()]
    if missing:
        raise CheckpointError(
            "the lab family is not built",
            [
                Problem(str(p), "missing", f"run `alloy lab build --preset {preset}`")
                for p in missing
            ],
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    texts, labels = read_reviews(data)
    data_sha = _sha256([data])
    tokenizer: Any = None  # loaded, and the label files written, only when something trains
    by_label = home / "reviews" / "data"
    out: dict[str, Path] = {}
    for size in sizes:
        parent_sha = _sha256(sorted(bases[size].glob("*.safetensors")))
        for i, (label, folder) in enumerate(expert_paths(root, preset, size).items()):
            stage = replace(spec.expert[size], save_every=0)
            job = Job(f"reviews/{size}/{label}", size, f"{size}/base", (label,), stage, seed + i)
            recipe = {
                "job": asdict(job),
                "preset": spec.describe(),
                "data_sha256": data_sha,
                "parent_sha256": parent_sha,
            }
            key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
            marker = folder / MARKER
            done = json.loads(marker.read_text()) if marker.is_file() else {}
            if done.get("key") != key or not (folder / "config.json").is_file():
                if tokenizer is None:
                    tokenizer = AutoTokenizer.from_pretrained(home / "tokenizer")
                    _write_label_files(by_label, texts, labels)
                files = [{"name": label, "path": str(by_label / f"{label}.jsonl")}]
                result = train_job(job, spec, root, tokenizer, device, data=files)
                done = {"key": key, "recipe": recipe, **result}
                tmp = marker.with_suffix(".tmp")
                tmp.write_text(json.dumps(done, indent=2) + "\n")
                tmp.replace(marker)
                status = "trained"
            else:
                status = "cached"
            print(f"{job.name}: loss {done['final_loss']:.3f} in {done['seconds']:.0f}s ({status})")
            out[f"{size}/{label}"] = folder
    return out


def _write_label_files(folder: Path, texts: list[str], labels: list[str]) -> None:
    """One JSONL file of `{"text"}` records per label: the training data of each expert (alloy
    train packs them with EOS between reviews, as the family's domains)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in LABELS:
        rows = [
            json.dumps({"text": t}) for t, lab in zip(texts, labels, strict=True) if lab == name
        ]
        tmp = folder / f"{name}.jsonl.tmp"
        tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
        tmp.replace(folder / f"{name}.jsonl")


def _sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _features(texts: Sequence[str], dim: int) -> torch.Tensor:
    """(N, dim) sparse CSR: presence of each hashed word unigram and bigram, rows L2-normalised.

    crc32 rather than `hash()`: Python salts string hashes per process, which would make a fitted
    classifier meaningless in the next process.
    """
    crow, cols, values = [0], [], []
    for text in texts:
        words = _TOKEN.findall(text.lower())
        grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
        hashed = sorted({zlib.crc32(g.encode()) % dim for g in grams})
        cols += hashed
        values += [len(hashed) ** -0.5] * len(hashed) if hashed else []
        crow.append(len(cols))
    shape = (len(texts), dim)
    return _csr(
        torch.tensor(crow), torch.tensor(cols, dtype=torch.long), torch.tensor(values), shape
    )


def _scale_columns(features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`features * scale[None, :]` for a sparse CSR `features` (N, F) and dense `scale` (F,)."""
    cols = features.col_indices()
    return _csr(features.crow_indices(), cols, features.values() * scale[cols], features.shape)


def _csr(
    crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: Sequence[int]
) -> torch.Tensor:
    """A checked sparse CSR tensor, without torch's "CSR support is in beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, tuple(shape), check_invariants=True)


@dataclass(frozen=True)
class SentimentClassifier:
    """P(review is "great") from hashed word uni- and bigrams: NB-weighted logistic regression.

    Features are scaled by their naive-Bayes log-count ratio before the logistic regression
    (NBSVM, Wang & Manning 2012, https://aclanthology.org/P12-2018/): on 4-fold cross-validation of
    train.jsonl that gave 0.807 against 0.80-0.806 for plain logistic regression on unigrams,
    bigrams, trigrams or character 4-grams; L2 1e-5 and 3e-5 tied, 1e-4 was worse (0.798).
    The fit is convex, starts from zero and runs full-batch L-BFGS, so it is deterministic.
    """

    weights: torch.Tensor  # (F,)
    ratios: torch.Tensor  # (F,) log P(feature | great) - log P(feature | other)
    bias: float

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        dim: int = 2**18,
        l2: float = 1e-5,
        steps: int = 200,
        smoothing: float = 1.0,
    ) -> SentimentClassifier:
        """Fit on `texts` labelled "great" or "other" (both must occur)."""
        unknown = sorted(set(labels) - set(LABELS))
        if len(texts) != len(labels) or unknown or len(set(labels)) < 2:
            raise InputError(
                "cannot fit the sentiment classifier",
                [
                    Problem(
                        "labels",
                        f"{len(labels)} labels for {len(texts)} texts; unknown {unknown}",
                        'use "great" and "other", both present, one per text',
                    )
                ],
            )
        features = _features(texts, dim)  # (N, F)
        target = torch.tensor([label == "great" for label in labels], dtype=torch.float32)  # (N,)
        rows = torch.repeat_interleave(torch.arange(len(texts)), features.crow_indices().diff())
        great = target[rows].bool()  # (nnz,) which class each stored feature belongs to
        cols = features.col_indices()
        counts = [smoothing + torch.bincount(cols[m], minlength=dim) for m in (great, ~great)]
        ratios = (counts[0] / counts[0].sum()).log() - (counts[1] / counts[1].sum()).log()  # (F,)
        scaled = _scale_columns(features, ratios)
        weights = torch.zeros(dim, requires_grad=True)
        prior = float(target.mean())
        bias = torch.tensor(math.log(prior / (1 - prior)), requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weights, bias], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = (scaled @ weights[:, None]).squeeze(1) + bias  # (N,)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            loss = loss + 0.5 * l2 * weights.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return cls(weights.detach(), ratios, float(bias.detach()))

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) log-odds that each text is "great"."""
        scaled = _scale_columns(_features(texts, len(self.weights)), self.ratios)
        return (scaled @ self.weights[:, None]).squeeze(1) + self.bias

    def prob_great(self, texts: Sequence[str]) -> list[float]:
        return torch.sigmoid(self.logits(texts)).tolist()

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> float:
        guesses = (self.logits(texts) > 0).tolist()
        return sum(g == (y == "great") for g, y in zip(guesses, labels, strict=True)) / len(labels)


def review_classifier(root: Path = ROOT / "runs" / "lab") -> tuple[SentimentClassifier, float]:
    """The judge fitted on train.jsonl and its accuracy on test.jsonl.

    Majority baseline (always "great"): 0.658 (`MAJORITY_ACCURACY`). The task is 5 stars versus
    1-4 stars, so 4-star praise counts as "other": bag-of-words models plateau near 0.80-0.83.
    """
    folder = root / "corpus" / "tasks" / "reviews"
    classifier = SentimentClassifier.fit(*read_reviews(folder / "train.jsonl"))
    return classifier, classifier.accuracy(*read_reviews(folder / "test.jsonl"))


def review_loglikelihoods(
    models: dict[str, Path], texts: Sequence[str], *, window: int = 256
) -> dict[str, list[tuple[float, int]]]:
    """Per model, per text: (summed log-likelihood in nats, scored tokens), BOS-prefixed texts."""
    from alloy.eval import load_scorer
    from alloy.eval.perplexity import score_text

    out = {}
    for name, path in models.items():
        scorer = load_scorer(path, name=name)
        scores = [score_text(scorer, [text], window=window) for text in texts]
        out[name] = [(-s.nll, s.tokens) for s in scores]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "lab")
    parser.add_argument("--preset", default="experiment")
    parser.add_argument("--sizes", nargs="+", default=["small"])
    args = parser.parse_args()

    quiet()
    print(machine())
    experts = train_review_experts(args.root, args.preset, args.sizes)
    t0 = time.perf_counter()
    _, accuracy = review_classifier(args.root)
    texts, labels = read_reviews(args.root / "corpus" / "tasks" / "reviews" / "test.jsonl")
    majority = max(labels.count(label) for label in LABELS) / len(labels)
    print(
        f"classifier: test accuracy {accuracy:.3f} (majority {majority:.3f}) "
        f"in {time.perf_counter() - t0:.0f}s"
    )
    for size in args.sizes:
        models = {
            "base": args.root / "family" / args.preset / size / "base",
            **{label: experts[f"{size}/{label}"] for label in LABELS},
        }
        scores = review_loglikelihoods(models, texts)
        print(f"{size}: mean log-likelihood per token of test reviews (nats)")
        for name, per_text in scores.items():
            means = {}
            for label in LABELS:
                chosen = [s for s, y in zip(per_text, labels, strict=True) if y == label]
                means[label] = sum(s[0] for s in chosen) / sum(s[1] for s in chosen)
            row = ", ".join(f"{label} texts {value:.3f}" for label, value in means.items())
            print(f"  {name:>5}: {row}")
        # The pair as a zero-shot classifier: does great-minus-other per token pick the label?
        margins = [
            (g[0] - o[0]) / max(g[1], 1)
            for g, o in zip(scores["great"], scores["other"], strict=True)
        ]
        hits = sum((m > 0) == (y == "great") for m, y in zip(margins, labels, strict=True))
        print(f"  expert pair as a classifier (great if margin > 0): {hits / len(labels):.3f}")


if __name__ == "__main__":
    main()

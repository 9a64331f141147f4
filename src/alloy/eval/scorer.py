"""What the evaluator scores: anything that gives per-token log-probabilities, or rewards.

`Scorer` is the one protocol every capability is judged through. A plain checkpoint implements
it here (`ModelScorer`); a decode-time ensemble, an averaged model or a proxy-tuned pair implement
the same two members and get perplexity, bits per byte and choice accuracy for free.

Shapes: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from alloy.errors import CheckpointError, NonFiniteError, Problem


@runtime_checkable
class Scorer(Protocol):
    """A language model as the evaluator sees it."""

    name: str
    tokenizer: Any  # a transformers tokenizer: encodes, decodes, knows BOS/EOS/pad
    max_length: int  # the longest sequence `token_logprobs` accepts

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T) with `[b, t] = log p(ids[b, t] | ids[b, :t])`; column 0 is 0."""
        ...


@runtime_checkable
class RewardScorer(Protocol):
    """A reward model: one scalar per text (higher is preferred)."""

    name: str
    tokenizer: Any
    max_length: int

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B,) rewards."""
        ...


def start_ids(tokenizer: Any) -> list[int]:
    """The token every scored or generated text starts with: BOS, else EOS (the document
    separator of GPT-2 style models, which is what they saw before a document), else none."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [] if start is None else [int(start)]


def gather_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token under `logits`, shifted into place.

    Args:
        logits: (B, T, V) scores of the token after each position.
        input_ids: (B, T).
    Returns:
        (B, T): `out[:, t] = log_softmax(logits[:, t - 1])[ids[:, t]]`, `out[:, 0] = 0`.
    """
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=logits.device)
    for b in range(logits.shape[0]):  # one row at a time: (T, V) fp32 log-softmax stays small
        logprobs = torch.log_softmax(logits[b, :-1].float(), dim=-1)  # (T-1, V)
        out[b, 1:] = logprobs.gather(-1, input_ids[b, 1:, None]).squeeze(-1)
    return out


@dataclass
class ModelScorer:
    """A Hugging Face causal LM (or sequence-classification reward model) as a scorer."""

    name: str
    model: Any
    tokenizer: Any
    max_length: int
    device: torch.device
    # Non-finite scores raise NonFiniteError; training evals turn it off to log `nan` instead.
    check_finite: bool = True

    @torch.inference_mode()
    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        return gather_logprobs(self._finite(logits), ids).cpu()

    @torch.inference_mode()
    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.model.config.pad_token_id is None:
            # Without a pad id the model reads its score at the last position, padding or not:
            # score rows one at a time, unpadded.
            rows = [
                self.model(input_ids=ids[mask.bool()][None].to(self.device)).logits[0, 0]
                for ids, mask in zip(input_ids, attention_mask, strict=True)
            ]
            return self._finite(torch.stack(rows)).float().cpu()
        out = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        )
        return self._finite(out.logits[:, 0]).float().cpu()  # (B,)

    def _finite(self, scores: torch.Tensor) -> torch.Tensor:
        # One reduction per batch: a NaN score must stop the run, not become a `nan` cell.
        if self.check_finite and not bool(torch.isfinite(scores).all()):
            raise NonFiniteError(
                f"{self.name}: the model's outputs hold NaN or infinity",
                [Problem(self.name, "scores are not finite", _NON_FINITE_HINT)],
            )
        return scores

    @property
    def is_reward_model(self) -> bool:
        architectures = getattr(self.model.config, "architectures", None) or [""]
        return str(architectures[0]).endswith("ForSequenceClassification")


_NON_FINITE_HINT = "the model overflows on this text; a model loaded in float16 may not in float32"


def _check_weights(model: Any, folder: Path) -> None:
    """Refuse a model whose weights hold NaN or infinity, naming the first such tensor."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(
                f"cannot evaluate {folder}",
                [
                    Problem(
                        name,
                        f"{bad} of {tensor.numel()} values are NaN or infinite",
                        "the checkpoint is broken (an overflowed merge or a diverged run?)",
                    )
                ],
            )


def load_pretrained(folder: Path, loader: Any, what: str = "", **kwargs: Any) -> Any:
    """`loader.from_pretrained(folder, **kwargs)`, its failures turned into a CheckpointError
    naming the folder (`what` names the role, e.g. "ensemble member x").

    `folder` may be `BASE+ADAPTER`: configs and tokenizers are BASE's, and a model is BASE with
    the PEFT adapter folded into its weights (alloy.adapters.adapted.fold_into).
    """
    from alloy.adapters.adapted import fold_into, split_spec

    base, adapter = split_spec(folder)
    try:
        loaded = loader.from_pretrained(base, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"cannot load {what or folder}",
            [Problem(str(base), str(exc).splitlines()[0], "is it a complete model folder?")],
        ) from exc
    if adapter is not None and isinstance(loaded, torch.nn.Module):
        fold_into(loaded, folder)
    return loaded


def load_scorer(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    name: str | None = None,
) -> ModelScorer:
    """Load a model folder, or `BASE+ADAPTER` (the adapter folded in), as a scorer (fp32 by
    default: this CPU has no fast bf16 matmul).

    A folder whose config names a `...ForSequenceClassification` architecture loads as a reward
    model; anything else as a causal LM.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from alloy.adapters.adapted import split_spec

    folder = Path(path)
    if not (split_spec(folder)[0] / "config.json").is_file():
        raise CheckpointError(
            f"cannot evaluate {folder}",
            [Problem(str(folder), "no config.json", "pass a Hugging Face model folder")],
        )
    config = load_pretrained(folder, AutoConfig)
    architecture = str((getattr(config, "architectures", None) or [""])[0])
    auto = (
        AutoModelForSequenceClassification
        if architecture.endswith("ForSequenceClassification")
        else AutoModelForCausalLM
    )
    model = load_pretrained(folder, auto, dtype=dtype, use_safetensors=not allow_pickle)
    tokenizer = load_pretrained(folder, AutoTokenizer)
    _check_weights(model, folder)
    model.eval()
    model.to(device)
    max_length = int(
        getattr(model.config, "max_position_embeddings", None)
        or getattr(model.config, "n_positions", None)
        or 1024
    )
    return ModelScorer(name or str(folder), model, tokenizer, max_length, torch.device(device))

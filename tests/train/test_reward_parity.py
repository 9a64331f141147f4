"""The reward objective against TRL's RewardTrainer (the peer implementation): the same loss and
the same gradients on the batch TRL's own collator builds (chosen then rejected, right padded),
with per-pair margins and the centring term, and without either.

Runs when TRL is installed (`pip install -e .[parity]`); TRL 1.16 on CPU needs bf16=False and
use_cpu=True.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from alloy.train.objectives.reward import Reward, load_reward_model
from alloy.train.recipe import ModelEntry

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _trl_trainer(
    model: Any, tokenizer: Any, folder: Path, *, margin: bool, center: float | None
) -> Any:
    import pyarrow as pa

    rows: list[dict[str, Any]] = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1) + "!" * a}
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]
    ]
    if margin:
        for i, row in enumerate(rows):
            row["margin"] = 0.5 * i
    # a fixed fingerprint: datasets' own hashing of a pyarrow table fails in some environments
    dataset = datasets.Dataset(pa.Table.from_pylist(rows), fingerprint=f"alloy-rm-{margin}")
    args = trl.RewardConfig(
        output_dir=str(folder),
        per_device_train_batch_size=4,
        center_rewards_coefficient=center,
        bf16=False,
        use_cpu=True,
        report_to=[],
    )
    return trl.RewardTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer
    )


@pytest.mark.parametrize(("margin", "center"), [(False, None), (True, 0.1)])
def test_loss_and_gradients_equal_trl(
    tiny_llama: Path, tmp_path: Path, margin: bool, center: float | None
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = AutoConfig.from_pretrained(tiny_llama)
    model = load_reward_model(ModelEntry(path=str(tiny_llama)), config, tokenizer, seed=0)
    with torch.no_grad():  # a head large enough that the rewards differ clearly
        model.score.weight.mul_(20)
    ours_model = copy.deepcopy(model)
    trainer = _trl_trainer(model, tokenizer, tmp_path, margin=margin, center=center)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, dict(batch))
    theirs.backward()

    pairs = batch["input_ids"].shape[0] // 2
    ours_batch = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pairs": torch.ones(pairs, dtype=torch.long),
    }
    if margin:
        ours_batch["margins"] = batch["margin"]
    ours_model.train()
    parts = Reward(center=center or 0.0).loss(ours_model, ours_batch)
    ours = parts.total / parts.count
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-5, rtol=1e-5)
    assert abs(ours.item() - 0.6931) > 1e-3
    mine = dict(ours_model.named_parameters())
    for name, p in trainer.model.named_parameters():
        assert p.grad is not None and mine[name].grad is not None, name
        torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)

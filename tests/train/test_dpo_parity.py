"""The dpo objective against TRL's DPOTrainer (the peer implementation): the same loss and the
same gradients on the batch TRL's own collator builds, for sigmoid DPO (summed and
length-normalised log-probabilities) and IPO.

Runs when TRL is installed (`pip install -e .[parity]`); TRL 1.16 on CPU needs bf16=False,
use_cpu=True and an explicit ref_model. Its conservative DPO is not compared: TRL 1.16's sigmoid
loss ignores label_smoothing (its `robust` loss is another formula).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from alloy.train.objectives.dpo import DPO
from alloy.train.preference import PreferenceEntry

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _trl_trainer(policy: Any, reference: Any, tokenizer: Any, loss: str, folder: Path) -> Any:
    import pyarrow as pa

    rows = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1) + "!" * a}
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]
    ]
    # a fixed fingerprint: datasets' own hashing of a pyarrow table fails in some environments
    dataset = datasets.Dataset(pa.Table.from_pylist(rows), fingerprint="alloy-dpo-parity")
    args = trl.DPOConfig(
        output_dir=str(folder),
        per_device_train_batch_size=4,
        beta=0.5,
        loss_type=[loss],
        bf16=False,
        use_cpu=True,
        report_to=[],
    )
    return trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


CASES = {  # TRL's loss_type -> our preference settings
    "sigmoid": {"loss": "sigmoid"},
    "sigmoid_norm": {"loss": "sigmoid", "length_normalize": True},
    "ipo": {"loss": "ipo"},
}


@pytest.mark.parametrize("loss", sorted(CASES))
def test_loss_and_gradients_equal_trl(tiny_llama: Path, tmp_path: Path, loss: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy off the reference, so h != 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ours_policy = copy.deepcopy(policy)
    trainer = _trl_trainer(policy, copy.deepcopy(reference), tokenizer, loss, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()

    ids, completion = batch["input_ids"], batch["completion_mask"]
    ours_batch = {
        "input_ids": ids,
        "attention_mask": batch["attention_mask"],
        "labels": ids.masked_fill(completion == 0, -100),
        "pairs": torch.ones(ids.shape[0] // 2, dtype=torch.long),
        "index": torch.arange(ids.shape[0] // 2),
    }
    objective = DPO(PreferenceEntry(beta=0.5, **CASES[loss]), reference.eval(), None)
    ours_policy.train()
    parts = objective.loss(ours_policy, ours_batch)
    ours = parts.total / parts.count
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-5, rtol=1e-5)
    assert abs(ours.item() - 0.6931) > 1e-3 or loss == "ipo"
    mine = dict(ours_policy.named_parameters())
    for name, p in trainer.model.named_parameters():
        assert p.grad is not None and mine[name].grad is not None, name
        torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)

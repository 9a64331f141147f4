"""Multi-token prediction: extra heads beside a causal LM (heads.py), their training loss
(losses.py; the objective is alloy.train.objectives.mtp) and self-speculative greedy decoding
with them (speculative.py). See docs/mtp.md."""

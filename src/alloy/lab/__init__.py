"""The lab: real corpora, tokenizers and model families built locally, for demos and experiments."""

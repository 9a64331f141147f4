"""Multi-token prediction heads beside a causal LM (Gloeckle et al. 2024,
https://arxiv.org/abs/2404.19737).

The model's own last decoder layer, final norm and unembedding are its next-token head; the
layers below it are the shared trunk. Head i (1..N) is one more decoder layer of the model's own
class with its own final norm, both initialised from the model's last layer and norm, and the
model's (shared) unembedding: from the trunk's hidden state at position t it predicts token
t + 1 + i. So every head starts as a copy of the next-token head and only has to learn the shift.

    trunk(x)[:, t] = h_t                                      # (B, T, H) input of the last layer
    logits_0 = unembed(norm(last_layer(h)))                   # the model's next-token logits
    logits_i = unembed(norm_i(layer_i(h)))                    # head i: token t + 1 + i

The trunk's output is read with a forward pre-hook on the last decoder layer (`TrunkCapture`),
which also records the attention mask, rotary embeddings and position ids the model built for
that layer, so a head attends exactly as the last layer does (padding, packed documents, KV
cache) whatever the architecture builds them from.

On disk the heads sit beside the model's own files, which stay a plain Hugging Face folder:

    mtp_heads.safetensors   layers.<i>.<name>, norms.<i>.<name>
    mtp_heads.json          format, heads, layer class, hidden size, vocabulary, how trained
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alloy.errors import CheckpointError, InputError, Problem

HEADS_FILE = "mtp_heads.safetensors"
INFO_FILE = "mtp_heads.json"
FORMAT = "alloy-mtp-heads"
ATTRIBUTE = "mtp_heads"  # where the heads sit on the model while it trains
_DROPPED = ("hidden_states", "cache", "past_key_values", "use_cache")


def decoder_parts(model: Any) -> tuple[nn.ModuleList, nn.Module]:
    """The decoder layers and final norm of a causal LM (Llama, Mistral, Qwen2 and kin).

    Raises:
        InputError: the model does not keep them as `layers` and `norm` of its decoder.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module) or not layers:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise InputError(
            f"multi-token heads need a decoder with `layers` and a final `norm`; {kind} has none",
            [Problem("model", f"{kind} is not supported", "use a Llama, Mistral or Qwen2 model")],
        )
    return layers, norm


def unembed(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """(..., H) normed hidden states -> (..., V) logits through the model's own LM head."""
    return model.get_output_embeddings()(hidden)


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class MTPHeads(nn.Module):
    """N extra heads: a decoder layer and a final norm each (the unembedding is the model's)."""

    def __init__(self, layers: list[nn.Module], norms: list[nn.Module]) -> None:
        super().__init__()
        assert len(layers) == len(norms) and layers
        self.layers = nn.ModuleList(layers)
        self.norms = nn.ModuleList(norms)

    def __len__(self) -> int:
        return len(self.layers)

    @classmethod
    def from_model(cls, model: Any, heads: int) -> MTPHeads:
        """`heads` copies of the model's last decoder layer and final norm (float32 copies of
        whatever dtype the model is in). Each keeps the last layer's index: at decoding time
        every head has its own KV cache, laid out as the model's (see speculative.py)."""
        layers, norm = decoder_parts(model)
        made = cls(
            [copy.deepcopy(layers[-1]) for _ in range(heads)],
            [copy.deepcopy(norm) for _ in range(heads)],
        )
        for p in made.parameters():
            p.requires_grad_(True)
        return made

    def hidden(
        self, i: int, trunk: torch.Tensor, layer_kwargs: dict[str, Any], cache: Any = None
    ) -> torch.Tensor:
        """(B, T, H) trunk states -> (B, T, H) normed states of head i (0-based), through its
        own `cache` when decoding."""
        out = self.layers[i](trunk, **layer_kwargs, cache=cache, use_cache=cache is not None)
        return self.norms[i](_layer_output(out))

    def save(self, folder: Path, info: dict[str, Any]) -> None:
        """Write mtp_heads.safetensors and mtp_heads.json into `folder`."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, folder / HEADS_FILE, metadata={"format": "pt"})
        write_info(folder, {**info, "heads": len(self)})


def write_info(folder: Path, info: dict[str, Any]) -> None:
    record = {"format": FORMAT, "version": 1, **info}
    (folder / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")


def head_info(model: Any) -> dict[str, Any]:
    """What mtp_heads.json records about the model the heads belong to."""
    layers, _ = decoder_parts(model)
    config = model.config
    return {
        "layer_class": type(layers[-1]).__name__,
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "trunk_layers": len(layers) - 1,
    }


def has_heads(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / HEADS_FILE).is_file() and (folder / INFO_FILE).is_file()


def read_info(folder: str | Path) -> dict[str, Any]:
    """mtp_heads.json of `folder`.

    Raises:
        InputError: the folder has no heads (with how to train them).
        CheckpointError: the file is not alloy's heads description.
    """
    folder = Path(folder)
    if not has_heads(folder):
        raise InputError(
            f"{folder}: no multi-token prediction heads ({HEADS_FILE} and {INFO_FILE})",
            [
                Problem(
                    str(folder),
                    "no heads to draft with",
                    "train them with `alloy train` and objective: mtp (docs/mtp.md)",
                )
            ],
        )
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{folder / INFO_FILE}: not JSON ({error})") from error
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{folder / INFO_FILE}: not an {FORMAT} description")
    return info


def load_heads(model: Any, folder: str | Path) -> MTPHeads:
    """The heads saved in `folder`, for `model` (the folder's own model), in its dtype and device.

    Raises:
        InputError: no heads in `folder`.
        CheckpointError: heads of another architecture or size, or missing tensors.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    info = read_info(folder)
    expected = head_info(model)
    wrong = [k for k, v in expected.items() if k != "trunk_layers" and info.get(k) != v]
    if wrong:
        found = ", ".join(f"{k} {info.get(k)!r} (model: {expected[k]!r})" for k in wrong)
        raise CheckpointError(f"{folder / INFO_FILE}: heads of another model: {found}")
    heads = MTPHeads.from_model(model, int(info["heads"]))
    state = load_file(folder / HEADS_FILE)
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / HEADS_FILE}: does not match {info['heads']} heads of "
            f"{info['layer_class']} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    parameter = next(model.parameters())
    heads.to(device=parameter.device, dtype=parameter.dtype)
    return heads.requires_grad_(False).eval()


def split_heads(folder: Path, info: dict[str, Any]) -> bool:
    """Move a saved model's `mtp_heads.*` tensors (the heads trained as its submodule) out of
    its weight files into mtp_heads.safetensors + mtp_heads.json, leaving a plain HF folder.

    Returns:
        whether there were heads to move.
    """
    from safetensors.torch import load_file, save_file

    prefix = ATTRIBUTE + "."
    heads: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name == HEADS_FILE:
            continue
        tensors = load_file(path)
        moved = {k: v for k, v in tensors.items() if k.startswith(prefix)}
        if not moved:
            continue
        heads.update({k.removeprefix(prefix): v for k, v in moved.items()})
        save_file(
            {k: v for k, v in tensors.items() if k not in moved}, path, metadata={"format": "pt"}
        )
    if not heads:
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            k: v for k, v in data.get("weight_map", {}).items() if not k.startswith(prefix)
        }
        index.write_text(json.dumps(data, indent=2) + "\n")
    save_file(heads, folder / HEADS_FILE, metadata={"format": "pt"})
    count = len({k.split(".")[1] for k in heads if k.startswith("layers.")})
    write_info(folder, {**info, "heads": count})
    return True


class _StopError(Exception):
    """Raised by the capture hook to end a forward pass at the last decoder layer."""


class TrunkCapture:
    """Records the input of the model's last decoder layer during a forward pass.

    `hidden` is the trunk's (B, T, H) output and `layer_kwargs` what the model passed the layer
    besides it (mask, rotary embeddings, position ids), minus the cache. With `stop`, the pass
    ends there (`trunk` below): the last layer and the (B, T, V) logits are never computed.
    """

    def __init__(self, model: Any, *, stop: bool = False) -> None:
        self.layer = decoder_parts(model)[0][-1]
        self.stop = stop
        self.hidden: torch.Tensor | None = None
        self.layer_kwargs: dict[str, Any] = {}
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.hidden = args[0] if args else kwargs["hidden_states"]
        self.layer_kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED}
        if self.stop:
            raise _StopError

    def __enter__(self) -> TrunkCapture:
        self._handle = self.layer.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> bool:
        self._handle.remove()
        return exc[0] is _StopError  # a stopped pass is not an error


def trunk(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The trunk's (B, T, H) output for `inputs` (a causal LM's forward arguments) and the last
    layer's other arguments, without running the last layer or the unembedding."""
    capture = TrunkCapture(model, stop=True)
    with capture:
        model(**inputs)
    assert capture.hidden is not None, "the last decoder layer never ran"
    return capture.hidden, capture.layer_kwargs

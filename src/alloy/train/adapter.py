"""Parameter-efficient training: PEFT adapters (LoRA, DoRA, VeRA) and GaLore's target matrices.

An `adapter:` section trains a PEFT adapter on a frozen start model instead of the model:

    adapter: {type: lora, rank: 8, alpha: 16, target_modules: [q_proj, v_proj]}

`lora` is LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685), `dora` LoRA with a trained
magnitude per output (Liu et al. 2024, https://arxiv.org/abs/2402.09353), `vera` VeRA: frozen
random projections shared by every layer, with per-layer trained scales (Kopiczko et al. 2024,
https://arxiv.org/abs/2310.11454). Target modules follow PEFT: a list holds module names
(`q_proj` matches every `....q_proj`), one string is a regular expression over whole names,
`all-linear` is every linear layer but the output head.

Every check runs before any weight is read, on the model built from its config on the meta
device: the module names and types are exactly those PEFT (and Trainer's GaLore) will see, with
no memory and no time spent, and the adapter is even attached there, so whatever PEFT refuses is
reported by `alloy validate` too, and the trainable parameter count is known in the plan.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from alloy.errors import InputError, Problem, did_you_mean
from alloy.io.yamlfile import StrictModel

Number = float | int
Issue = tuple[str, str, str | None]  # (YAML path, problem, hint)
ALL_LINEAR = "all-linear"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GALORE_OPTIMIZERS = {"galore_adamw": "galore_adamw"}
GALORE_DEFAULTS: dict[str, Any] = {"rank": 128, "update_proj_gap": 200, "scale": 0.25}
GALORE_TARGETS = ["attn", "mlp"]  # transformers' GaLore: names containing these


class VeraEntry(StrictModel):
    d_initial: Number = Field(default=0.1, gt=0)  # initial value of the per-rank scale d
    projection_prng_key: int = Field(default=0, ge=0)  # seed of the shared random projections


class AdapterEntry(StrictModel):
    type: Literal["lora", "dora", "vera"] = "lora"
    rank: int = Field(default=8, ge=1)
    alpha: Number = Field(default=16, gt=0)  # lora / dora: the update is scaled alpha / rank
    dropout: Number = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | str = ALL_LINEAR
    use_rslora: bool = False  # lora / dora: scale alpha / sqrt(rank) (Kalajdzievski 2023)
    modules_to_save: list[str] = Field(default_factory=list)  # trained in full and saved
    vera: VeraEntry | None = None
    merge: bool = False  # write the start model with the adapter folded in


def quiet_imports() -> None:
    """Call before importing peft or galore_torch: both import bitsandbytes, which on a machine
    without its compiled kernels logs warnings about them (and `kernels` about offline mode)."""
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


# transformers' trainer_utils imports peft whenever it is installed, so any Trainer import does:
# quiet them as soon as alloy.train loads (this module is imported by recipe.py).
quiet_imports()


@contextlib.contextmanager
def _peft() -> Iterator[Any]:
    """The peft module, with the FutureWarning PeftModel triggers in transformers 5 (it reads
    the deprecated `is_gradient_checkpointing`) silenced: it is PEFT's to fix, not the user's."""
    quiet_imports()
    import peft

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        yield peft


def adapter_issues(spec: Any) -> list[Issue]:
    """Problems of a recipe's `adapter:` (`spec` is the TrainRecipe) checkable without a model."""
    entry: AdapterEntry | None = spec.adapter
    if entry is None:
        return []
    issues: list[Issue] = []

    def add(where: str, message: str, hint: str | None = "remove it") -> None:
        issues.append((where, message, hint))

    if spec.model.path is None:
        add("adapter", "an adapter adapts a trained model", "give model: PATH, or drop adapter:")
    if entry.type == "vera":
        if entry.use_rslora:
            add("adapter.use_rslora", "rsLoRA scales LoRA by alpha / sqrt(rank); VeRA has no alpha")
        if "alpha" in entry.model_fields_set:
            add("adapter.alpha", "VeRA has no alpha (its per-layer scales are trained)")
    elif entry.vera is not None:
        add("adapter.vera", f"applies to type: vera, not {entry.type}")
    targets = entry.target_modules
    example = f"e.g. [q_proj, v_proj], or {ALL_LINEAR}"
    if not (targets.strip() if isinstance(targets, str) else targets):
        add("adapter.target_modules", "empty", example)
    elif isinstance(targets, str):
        if targets.lower() != ALL_LINEAR:
            issues += _regex_issue(targets, "adapter.target_modules")
    else:
        for i, name in enumerate(targets):
            if not name.strip():
                add(f"adapter.target_modules.{i}", "an empty module name", example)
            elif name in entry.modules_to_save:
                add(
                    "adapter.modules_to_save",
                    f"{name!r} is also a target module",
                    "a module is either adapted or trained in full",
                )
    if spec.optimizer.name in GALORE_OPTIMIZERS:
        add(
            "optimizer.name",
            "GaLore projects the gradients of full weight matrices; with an adapter only the "
            "small adapter matrices train",
            "use adamw with adapter:, or drop adapter:",
        )
    for name, options in (spec.averaging or {}).items():
        if options.get("trainable_only") is False:
            add(
                f"averaging.{name}.trainable_only",
                "with an adapter only the adapter's parameters change, and only they are averaged",
            )
    return issues


def galore_issues(optimizer: Any) -> list[Issue]:
    """Problems of GaLore's keys in `optimizer:` (their ranges are the schema's)."""
    import importlib.util

    issues: list[Issue] = []
    if optimizer.name not in GALORE_OPTIMIZERS:
        for key in (*GALORE_DEFAULTS, "target_modules"):
            if getattr(optimizer, key) is not None:
                issues.append((f"optimizer.{key}", "applies to galore_adamw only", None))
        return issues
    if importlib.util.find_spec("galore_torch") is None:
        hint = "pip install 'alloy[galore]'"
        issues.append(("optimizer.name", f"{optimizer.name} needs the galore-torch package", hint))
    targets = optimizer.target_modules
    if targets is not None and not (targets.strip() if isinstance(targets, str) else targets):
        issues.append(("optimizer.target_modules", "empty", f"e.g. [attn, mlp], or {ALL_LINEAR}"))
    elif isinstance(targets, str) and targets.lower() != ALL_LINEAR:
        issues += _regex_issue(targets, "optimizer.target_modules")
    return issues


def _regex_issue(pattern: str, where: str) -> list[Issue]:
    try:
        re.compile(pattern)
    except re.error as error:
        return [(where, f"not a regular expression: {error}", "a list of names needs [ ]")]
    return []


# ---- checks against the model (meta device) ---------------------------------------------------


@dataclass(frozen=True)
class AdapterPlan:
    """What an adapter will train, resolved on the meta model."""

    entry: AdapterEntry
    modules: list[str]  # adapted module names
    saved: list[str]  # modules_to_save: trained in full
    trainable: int  # parameters that train
    total: int  # parameters of the adapted model (adapter included)

    def summary(self) -> str:
        e = self.entry
        scaling = (
            ""
            if e.type == "vera"
            else f", alpha {e.alpha:g}" + (" (rsLoRA)" if e.use_rslora else "")
        )
        leaves = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in self.modules}))
        saved = f"; trained in full: {', '.join(self.saved)}" if self.saved else ""
        return (
            f"adapter: {e.type} rank {e.rank}{scaling} on {len(self.modules)} modules "
            f"({leaves}){saved}; {self.trainable:,} trainable parameters of {self.total:,} "
            f"({self.trainable / max(1, self.total):.2%})"
        )


@dataclass(frozen=True)
class GaLorePlan:
    """The weight matrices GaLore projects (name, (out, in)), resolved as transformers does."""

    rank: int
    targets: list[tuple[str, tuple[int, int]]]

    def optimizer_bytes(self, params: int) -> float:
        """fp32 AdamW moments: 2 per parameter outside the targets; per (m, n) target, two
        moments of r x max(m, n) and an r x min(m, n) projection."""
        projected = sum(m * n for _, (m, n) in self.targets)
        low = sum(
            2 * min(self.rank, m, n) * max(m, n) + min(self.rank, m, n) * min(m, n)
            for _, (m, n) in self.targets
        )
        return 4.0 * (2 * (params - projected) + low)


def meta_model(config: Any, *, reward: bool = False) -> Any:
    """The causal LM of `config` (with `reward`, its one-score sequence classifier), built on
    the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if reward:
            from alloy.train.objectives.reward import reward_config

            pad = config.pad_token_id if config.pad_token_id is not None else 0
            return AutoModelForSequenceClassification.from_config(reward_config(config, pad))
        return AutoModelForCausalLM.from_config(config)


def plan_adapter(entry: AdapterEntry, config: Any, *, reward: bool = False) -> AdapterPlan:
    """Resolve the adapter's modules on the meta model and attach it there.

    Raises:
        InputError: a target that matches no module (with the names that exist), a matched
            module that is not a layer the adapter type supports, a rank above a targeted
            matrix's smaller side, or anything else PEFT refuses.
    """
    model = meta_model(config, reward=reward)
    modules = dict(model.named_modules())
    problems: list[Problem] = []
    saved = _modules_to_save(entry, modules, problems)
    if reward:  # PEFT's SEQ_CLS task trains the head in full, and adapts nothing in it
        saved += [h for h in ("classifier", "score") if h in modules and h not in saved]
    matched = _adapter_targets(entry, model, saved, problems)
    kinds, described = _layer_types(entry.type)
    unfit = [n for n in matched if not isinstance(modules[n], kinds)]
    if unfit:
        shown = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in unfit[:3])
        more = f" and {len(unfit) - 3} more" if len(unfit) > 3 else ""
        problems.append(
            Problem(
                "adapter.target_modules",
                f"matches modules {entry.type} cannot adapt: {shown}{more}",
                f"{entry.type} adapts {described}: name those, e.g. {_examples(model, kinds)}",
            )
        )
    for name in (n for n in matched if n not in unfit):
        shape = tuple(modules[name].weight.shape)
        if entry.rank > min(shape):
            problems.append(
                Problem(
                    "adapter.rank",
                    f"{entry.rank} is larger than {name}'s {shape} weight allows "
                    f"(its rank is at most {min(shape)})",
                    f"set rank: {min(shape)} or lower, or leave that module out",
                )
            )
            break  # one is enough: the fix is the same for the others
    if problems:
        raise InputError("the adapter does not fit the model", problems)
    try:
        with _peft() as peft:
            wrapped = peft.get_peft_model(model, peft_config(entry, reward=reward))
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        raise InputError(
            "the adapter does not fit the model", [Problem("adapter", str(error).splitlines()[0])]
        ) from error
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    saved_names = sorted(n for n in modules if _saved(n, saved))
    return AdapterPlan(entry, matched, saved_names, trainable, total)


def _layer_types(kind: str) -> tuple[tuple[type, ...], str]:
    import torch
    from transformers.pytorch_utils import Conv1D

    if kind == "vera":  # PEFT's VeRA: nn.Linear only
        return (torch.nn.Linear,), "linear layers (nn.Linear) only"
    return (torch.nn.Linear, Conv1D, torch.nn.Embedding), "linear layers and embeddings"


def _linear_names(model: Any) -> list[str]:
    """Every linear layer (nn.Linear or GPT-2's Conv1D) but the output head: PEFT's all-linear."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head
    ]


def _leaves(names: Iterable[str]) -> list[str]:
    """The distinct last parts of module names (q_proj, embed_tokens), list indices left out."""
    last = (name.rsplit(".", 1)[-1] for name in names if name)
    return sorted({leaf for leaf in last if not leaf.isdigit()})


def _layer_leaves(model: Any) -> list[str]:
    """The last name parts of the model's modules that hold a weight (its layers)."""
    import torch

    return _leaves(
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.nn.Parameter)
    )


def _examples(model: Any, kinds: tuple[type, ...] | None = None, count: int = 3) -> str:
    """A few full names of the model's linear layers (but the head; of `kinds` only), one per
    distinct last part, for hints."""
    modules = dict(model.named_modules())
    seen: dict[str, str] = {}
    for name in _linear_names(model):
        if kinds is None or isinstance(modules[name], kinds):
            seen.setdefault(name.rsplit(".", 1)[-1], name)
    return ", ".join(list(seen.values())[:count]) or "(this model has none)"


def _saved(name: str, saved: list[str]) -> bool:
    """PEFT's modules_to_save rule: the module's name ends with one of the entries."""
    return any(name.endswith(s) for s in saved)


def _modules_to_save(
    entry: AdapterEntry, modules: dict[str, Any], problems: list[Problem]
) -> list[str]:
    for i, name in enumerate(entry.modules_to_save):
        if not any(key.endswith(name) for key in modules if key):
            problems.append(
                Problem(
                    f"adapter.modules_to_save.{i}",
                    f"{name!r} matches no module",
                    did_you_mean(name, _leaves(modules), "module names"),
                )
            )
    return list(entry.modules_to_save)


def _adapter_targets(
    entry: AdapterEntry, model: Any, saved: list[str], problems: list[Problem]
) -> list[str]:
    """The module names PEFT will adapt (modules_to_save and their children excluded, as PEFT
    excludes them); a problem for every target that matches nothing."""
    names = [name for name, _ in model.named_modules() if name]
    excluded = [re.compile(rf"(^|.*\.){re.escape(m)}($|\..*)") for m in saved]

    def kept(name: str) -> bool:
        return not any(p.match(name) for p in excluded)

    targets = entry.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        found = [n for n in _linear_names(model) if kept(n)]
        if not found:
            problems.append(Problem("adapter.target_modules", "the model has no linear layers"))
        return found
    if isinstance(targets, str):
        found = [n for n in names if re.fullmatch(targets, n) and kept(n)]
        if not found:
            problems.append(
                Problem(
                    "adapter.target_modules",
                    f"the regular expression {targets!r} matches no module name",
                    f"it must match whole names, e.g. {_examples(model)}; or give a list of "
                    "names: [q_proj, v_proj]",
                )
            )
        return found
    found = []
    for i, target in enumerate(targets):
        hits = [n for n in names if (n == target or n.endswith(f".{target}")) and kept(n)]
        if not hits:
            problems.append(
                Problem(
                    f"adapter.target_modules.{i}",
                    f"{target!r} matches no module of the model",
                    did_you_mean(target, _layer_leaves(model), "layer names")
                    + " (list entries are names; one string is a regular expression)",
                )
            )
        found += [n for n in hits if n not in found]
    return sorted(found, key=names.index)


def plan_galore(optimizer: Any, config: Any) -> GaLorePlan:
    """The nn.Linear weights transformers' GaLore will project, matched as it matches them: a
    list entry is contained in the module's name (or matches it whole as a regex), a string is
    a regex over whole names, all-linear every nn.Linear.

    Raises:
        InputError: an entry (or the pattern) that matches no linear layer.
    """
    import torch
    from transformers.trainer_utils import check_target_module_exists

    model = meta_model(config)
    targets = optimizer.target_modules if optimizer.target_modules is not None else GALORE_TARGETS
    linear = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    everything = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    hint = f"GaLore projects nn.Linear weights, e.g. {_examples(model, (torch.nn.Linear,))}"
    problems: list[Problem] = []
    entries = [targets] if isinstance(targets, str) else targets
    for i, entry in enumerate(entries):
        if everything or any(
            check_target_module_exists(entry if isinstance(targets, str) else [entry], n)
            for n in linear
        ):
            continue
        where = "optimizer.target_modules" + ("" if isinstance(targets, str) else f".{i}")
        problems.append(Problem(where, f"{entry!r} matches no linear layer of the model", hint))
    if problems:
        raise InputError("GaLore's target modules do not fit the model", problems)
    chosen = [
        (name, (int(m.out_features), int(m.in_features)))
        for name, m in linear.items()
        if everything or check_target_module_exists(targets, name)
    ]
    return GaLorePlan(int(optimizer.rank or GALORE_DEFAULTS["rank"]), chosen)


# ---- training and writing ---------------------------------------------------------------------


def peft_config(entry: AdapterEntry, *, reward: bool = False) -> Any:
    """The PEFT config of an `adapter:` entry (LoraConfig or VeraConfig): a causal LM task, or
    with `reward` sequence classification (PEFT then trains and saves the `score` head in full,
    as a module to save)."""
    quiet_imports()
    import peft

    targets: Any = entry.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = ALL_LINEAR
    common: dict[str, Any] = {
        "r": entry.rank,
        "target_modules": targets,
        "modules_to_save": list(entry.modules_to_save) or None,
        "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
    }
    if entry.type == "vera":
        vera = entry.vera or VeraEntry()
        return peft.VeraConfig(
            **common,
            vera_dropout=float(entry.dropout),
            d_initial=float(vera.d_initial),
            projection_prng_key=vera.projection_prng_key,
            save_projection=True,  # the folder then holds everything it needs to load
        )
    return peft.LoraConfig(
        **common,
        lora_alpha=float(entry.alpha),  # type: ignore[arg-type]  # annotated int, used as float
        lora_dropout=float(entry.dropout),
        use_rslora=entry.use_rslora,
        use_dora=entry.type == "dora",
    )


def wrap_model(model: Any, entry: AdapterEntry, base: str) -> Any:
    """`model` with the adapter attached (PEFT's get_peft_model): only the adapter (and
    modules_to_save) train. `base` is recorded as the adapter's base_model_name_or_path."""
    from alloy.train.objectives.reward import is_reward_config

    with _peft() as peft:
        wrapped = peft.get_peft_model(
            model, peft_config(entry, reward=is_reward_config(model.config))
        )
    for config in wrapped.peft_config.values():
        config.base_model_name_or_path = base
    return wrapped


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, all) parameters of a model, each tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

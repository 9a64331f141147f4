"""The registry of merge methods: one file per method, described by its signature.

A method is a factory `name(*, <parameters>) -> Merger` in `alloy/merge/methods/<name>.py`,
decorated with `@merge_method(...)`. The Merger does the maths over row blocks (see
alloy.merge.blocks); calling the registered method with tensors runs it over them in memory,
which makes it the plain pure function "tensors in, tensor out". The decorator reads the
signature to learn the parameters (keyword-only, annotated, with defaults where optional), so the
recipe validator, `alloy methods` and the contract tests all see the same description.

Conventions of the factory:
    per-model parameters        list[float] with one value per model, named in `per_model=`
    shared parameters           bool, int, float, str or Literal[...] scalars with defaults
    numbers                     declare their valid values: Annotated[float, Range(0, 1)]
                                (or Annotated[list[float], ...]); registering fails without one
The Merger never touches files, devices or dtypes: it gets blocks of the inputs (models in
order, then the base) in the compute dtype and returns blocks of the output.

Recipe names equal Python names except that a trailing underscore is dropped (`lambda_` is the
recipe's `lambda`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch

from alloy.merge.blocks import Merger, run
from alloy.ranges import Range

BasePolicy = Literal["required", "optional", "none"]
_SCALARS: dict[Any, type] = {bool: bool, int: int, float: float, str: str}

# Properties a method may declare; each is checked for every method by the contract tests.
PROPERTIES = {
    "idempotent": "merging copies of one tensor (base included) returns that tensor",
    "base_fixed_point": "when every model equals the base, the result is the base",
    "order_invariant": "permuting the models (with their parameters) does not change the result",
}


@dataclass(frozen=True)
class Param:
    """One parameter of a method as recipes see it."""

    name: str  # recipe name, e.g. "lambda"
    arg: str  # Python argument name, e.g. "lambda_"
    kind: type  # bool, int, float or str
    default: Any  # REQUIRED if the recipe must give it
    per_model: bool
    doc: str = ""
    choices: tuple[str, ...] | None = None  # allowed values of a str parameter (a Literal)
    range: Range | None = None  # valid values of a number parameter (every number has one)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., Merger]
    params: Mapping[str, Param]
    base: BasePolicy
    min_models: int
    max_models: int | None
    reference: str
    summary: str
    properties: frozenset[str] = field(default_factory=frozenset)
    random: bool = False

    def make(self, n_models: int, **params: Any) -> Merger:
        """The Merger for recipe-named parameters (defaults filled in, per-model ones expanded)."""
        kwargs: dict[str, Any] = {}
        for name, value in params.items():
            if name not in self.params:
                raise TypeError(f"{self.name} has no parameter {name!r}")
            kwargs[self.params[name].arg] = value
        for param in self.params.values():
            if param.arg not in kwargs:
                if param.required:
                    raise TypeError(f"{self.name} needs parameter {param.name!r}")
                default = param.default
                kwargs[param.arg] = [default] * n_models if param.per_model else default
        return self.fn(**kwargs)

    def __call__(
        self,
        models: Sequence[torch.Tensor],
        *,
        base: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        **params: Any,
    ) -> torch.Tensor:
        """Merge in-memory tensors: the method as a pure function, with recipe-named parameters.

        Random methods draw from `seed` (or the initial seed of `generator`; default 0).
        """
        if seed is None:
            seed = generator.initial_seed() if generator is not None else 0
        merger = self.make(len(models), **params)
        return run(merger, list(models), base if self.base != "none" else None, seed=seed)


METHODS: dict[str, MethodSpec] = {}


def merge_method(
    *,
    base: BasePolicy,
    reference: str,
    per_model: Mapping[str, Any] = {},
    min_models: int = 1,
    max_models: int | None = None,
    properties: tuple[str, ...] = (),
    random: bool = False,
) -> Callable[[Callable[..., Merger]], Callable[..., Merger]]:
    """Register a merge method.

    Args:
        base: whether the method needs a base model ("required"), can use one ("optional") or
            ignores it ("none").
        reference: the paper or page defining the method.
        per_model: per-model parameters and their defaults (REQUIRED if none); the function takes
            each as a list[float] with one value per model.
        min_models, max_models: how many non-base models the method accepts.
        properties: names from PROPERTIES that the method guarantees.
        random: whether the method draws random numbers (from each block's generator).
    """

    def register(fn: Callable[..., Merger]) -> Callable[..., Merger]:
        spec = _describe(fn, base, reference, per_model, min_models, max_models, properties)
        spec = dataclasses.replace(spec, random=random)
        if spec.name in METHODS:
            raise ValueError(f"merge method {spec.name!r} is registered twice")
        METHODS[spec.name] = spec
        return fn

    return register


def _describe(
    fn: Callable[..., Merger],
    base: BasePolicy,
    reference: str,
    per_model: Mapping[str, Any],
    min_models: int,
    max_models: int | None,
    properties: tuple[str, ...],
) -> MethodSpec:
    name = fn.__name__
    stem = fn.__module__.rsplit(".", 1)[-1]
    if stem != name:
        raise ValueError(f"method {name!r} must live in a file named {name}.py, not {stem}.py")
    unknown = set(properties) - set(PROPERTIES)
    if unknown:
        raise ValueError(f"{name}: unknown properties {sorted(unknown)}")
    signature = inspect.signature(fn)
    # Parameter annotations only: the return type (the Merger class) may be defined further down.
    hints = {
        key: eval(value, fn.__globals__) if isinstance(value, str) else value
        for key, value in fn.__annotations__.items()
        if key != "return"
    }
    docs = _arg_docs(fn.__doc__ or "")
    params: dict[str, Param] = {}
    for p in signature.parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise ValueError(f"{name}: parameter {p.name!r} must be keyword-only")
        if p.name not in hints:
            raise ValueError(f"{name}: parameter {p.name!r} has no type annotation")
        recipe_name = p.name.rstrip("_")
        hint, valid = _split_range(hints[p.name])
        if hint in (float, int, list[float]) and valid is None:
            raise ValueError(
                f"{name}: number parameter {p.name!r} declares no range "
                "(annotate it as Annotated[float, Range(...)])"
            )
        if p.name in per_model:
            if hint != list[float]:
                raise ValueError(f"{name}: per-model parameter {p.name!r} must be list[float]")
            default = per_model[p.name]
            params[recipe_name] = Param(
                recipe_name, p.name, float, default, True, docs.get(p.name, ""), None, valid
            )
            continue
        choices = None
        kind: type
        if typing.get_origin(hint) is Literal and all(
            isinstance(a, str) for a in typing.get_args(hint)
        ):
            kind, choices = str, tuple(typing.get_args(hint))
        elif hint in _SCALARS:
            kind = _SCALARS[hint]
        else:
            raise ValueError(
                f"{name}: parameter {p.name!r} must be bool, int, float, str or a Literal"
            )
        default = REQUIRED if p.default is inspect.Parameter.empty else p.default
        params[recipe_name] = Param(
            recipe_name, p.name, kind, default, False, docs.get(p.name, ""), choices, valid
        )
    missing = set(per_model) - {p.arg for p in params.values()}
    if missing:
        raise ValueError(f"{name}: per_model names {sorted(missing)} are not parameters")
    summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
    module_doc = (inspect.getmodule(fn).__doc__ or "") if inspect.getmodule(fn) else ""
    if not summary or not module_doc or reference not in module_doc:
        raise ValueError(f"{name}: needs a docstring and a module docstring citing {reference}")
    return MethodSpec(
        name=name,
        fn=fn,
        params=params,
        base=base,
        min_models=min_models,
        max_models=max_models,
        reference=reference,
        summary=summary,
        properties=frozenset(properties),
    )


def _split_range(hint: Any) -> tuple[Any, Range | None]:
    """(type, Range) of an annotation, unwrapping `Annotated[type, Range(...)]`."""
    if typing.get_origin(hint) is Annotated:
        kind, *extras = typing.get_args(hint)
        ranges = [extra for extra in extras if isinstance(extra, Range)]
        return kind, ranges[0] if ranges else None
    return hint, None


_ARG_LINE = re.compile(r"^\s{4,}(\w+):\s*(.*)$")


def _arg_docs(doc: str) -> dict[str, str]:
    """Parameter descriptions from a Google-style `Args:` section."""
    result: dict[str, str] = {}
    in_args = False
    current = None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if (
            in_args
            and stripped.endswith(":")
            and not line.startswith(" " * 8)
            and " " not in stripped
        ):
            in_args = False  # the next section (Returns:, ...)
        if not in_args:
            continue
        match = _ARG_LINE.match(line)
        if match and len(line) - len(line.lstrip()) <= 8:
            current = match.group(1)
            result[current] = match.group(2).strip()
        elif current and stripped:
            result[current] += " " + stripped
    return result


def get_method(name: str) -> MethodSpec:
    """The registered method called `name` (KeyError if none)."""
    _load_all()
    return METHODS[name]


def all_methods() -> dict[str, MethodSpec]:
    _load_all()
    return dict(sorted(METHODS.items()))


def _load_all() -> None:
    # Importing the package imports every method file, which registers it.
    import alloy.merge.methods  # noqa: F401

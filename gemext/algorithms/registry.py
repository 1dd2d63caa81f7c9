"""The catalogue's registry: each name `create` accepts, per domain, and the rule that a learner's
options are its class's keyword parameters (unknown, ignored or ill-typed ones refused with the
valid list)."""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .base import MetaLearner

# domain ("supervised": a model fitted on (x, y) tasks; "rl": a policy meta-trained on rollouts)
# -> name -> (learner class, variant or None)
_REGISTRY: dict[str, dict[str, tuple[type, str | None]]] = {"supervised": {}, "rl": {}}
_RESERVED = ("self", "model", "variant")


def register_class(cls: type, *names: str, domain: str = "supervised") -> None:
    """Register `cls(model, **options)` under each name."""
    for n in names:
        _REGISTRY[domain][n] = (cls, None)


def register_variants(cls: type, *variants: str, domain: str = "supervised") -> None:
    """Register `cls(model, variant=name, **options)` under each variant name."""
    for v in variants:
        _REGISTRY[domain][v] = (cls, v)


def _domain(domain: str) -> dict[str, tuple[type, str | None]]:
    if domain not in _REGISTRY:
        raise ValueError(f"unknown learner domain {domain!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[domain]


def _class_params(name: str, domain: str = "supervised") -> dict[str, inspect.Parameter]:
    """The keyword parameters of the learner class's __init__ along its bases (followed while an
    __init__ forwards **options), whichever variant uses them."""
    found: dict[str, inspect.Parameter] = {}
    for klass in _domain(domain)[name][0].__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _RESERVED:
                found.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return found


def _other_variants(name: str, option: str, domain: str = "supervised") -> tuple[str, ...]:
    """The variants that use `option` when `name` (a variant of a shared class) does not; () when
    `name` uses it. A class declares such options in `variant_options` (option -> its variants)."""
    cls, variant = _domain(domain)[name]
    users = getattr(cls, "variant_options", {}).get(option)
    return () if variant is None or users is None or variant in users else tuple(users)


def _option_params(name: str, domain: str = "supervised") -> dict[str, inspect.Parameter]:
    """The options of `name`: its class's keyword parameters, less those only other variants use."""
    return {k: p for k, p in _class_params(name, domain).items() if not _other_variants(name, k, domain)}


def option_names(name: str, domain: str = "supervised") -> list[str]:
    """The options `create(name, model, **options)` accepts."""
    return sorted(_option_params(name, domain))


# annotation (as written, postponed) -> accepted Python types, for the option type check
_SIMPLE_TYPES = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,), "dict": (dict,)}


def _type_error(name: str, option: str, annotation: str, value: Any) -> str | None:
    """Why `value` does not fit the option's annotation (None when it does or cannot be checked)."""
    allowed: list[type] = []
    for part in (a.strip() for a in str(annotation).split("|")):
        if part == "None":
            allowed.append(type(None))
        elif part in _SIMPLE_TYPES:
            allowed += _SIMPLE_TYPES[part]
        else:
            return None  # a richer type (a module, a tuple, a config object): the learner checks it
    if not allowed or isinstance(value, tuple(allowed)):
        if not (isinstance(value, bool) and bool not in allowed):  # True is not a number here
            return None
    return f"{name}: option {option} must be {annotation}, got {type(value).__name__} {value!r}"


def check_options(name: str, options: dict[str, Any], domain: str = "supervised") -> None:
    """Refuse unknown or ill-typed options with the list of valid ones."""
    params = _option_params(name, domain)
    unknown = sorted(set(options) - set(params))
    for option in unknown:
        users = _other_variants(name, option, domain)
        if users:  # accepted by the class, but this variant would ignore it
            raise ValueError(f"{name}: option {option} is used only by {', '.join(users)}, not by {name}; "
                             f"valid: {', '.join(sorted(params))}")
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(params))}")
    for option, value in options.items():
        why = _type_error(name, option, params[option].annotation, value)
        if why is not None:
            raise TypeError(why)


def names(domain: str = "supervised") -> list[str]:
    """Names registered in a domain (gemext.algorithms.names loads the RL learners first)."""
    return sorted(_domain(domain))


def create(name: str, model: nn.Module, domain: str = "supervised", **options: Any) -> MetaLearner:
    """A learner of algorithm `name` over `model` (which it takes ownership of)."""
    registry = _domain(domain)
    if name not in registry:
        what = "unknown algorithm" if all(name not in r for r in _REGISTRY.values()) else "no learner for"
        raise ValueError(f"{what} {name!r} in the {domain} domain; available: {', '.join(names(domain))}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_options(name, options, domain)
    cls, variant = registry[name]
    return cls(model, **options) if variant is None else cls(model, variant=variant, **options)

"""Config fields that carry their own comment and range: the one source of every key's default, meaning and limits.

    lr: float = knob(3e-4, "AdamW learning rate", gt=0)

declares a dataclass field whose default, one-line comment and accepted values live together. Hydra composes the
dataclasses as structured configs (types are checked when an override is merged); `check_ranges` checks the limits;
`accepted` says in words what a key takes, for error messages and `--help`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

Number = int | float


def knob(default: Any, doc: str, *, ge: Number | None = None, gt: Number | None = None, le: Number | None = None,
         lt: Number | None = None, choices: tuple | None = None) -> Any:  # fmt: skip
    """A dataclass field with its comment and limits (`ge` >=, `gt` >, `le` <=, `lt` <, `choices`). Limits apply to
    every element of a list-valued key and every value of a dict-valued one; None (for optional keys) is always
    accepted."""
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def hints(cls: type) -> dict[str, Any]:
    """The field annotations of a dataclass, resolved (modules here use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def optional_inner(annotation: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...] or `X | None`, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 else Any), True
    return annotation, False


TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
LIST_WORDS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def type_words(annotation: Any) -> str:
    inner, nullable = optional_inner(annotation)
    if typing.get_origin(inner) is list:
        (element,) = typing.get_args(inner) or (Any,)
        words = "a list of " + LIST_WORDS.get(element, "values")
    elif typing.get_origin(inner) is dict:
        _, element = typing.get_args(inner) or (str, Any)
        words = "a mapping of names to " + LIST_WORDS.get(element, "values")
    else:
        words = TYPE_WORDS.get(inner, "a value")
    if nullable:
        return words.replace("true or false", "true, false") + " or null"
    return words


def limits_words(meta: dict) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    parts = [f"{symbol} {meta[key]}" for key, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
             if meta.get(key) is not None]  # fmt: skip
    return " and ".join(parts)


def accepted(field: dataclasses.Field, annotation: Any) -> str:
    """What a key takes, in words: 'an integer >= 1', 'one of fp32, bf16', 'a number > 0 or null'."""
    words = type_words(annotation)
    limits = limits_words(field.metadata)
    if field.metadata.get("choices"):
        return limits + (" or null" if optional_inner(annotation)[1] else "")
    if not limits:
        return words
    if words.endswith(" or null"):
        return f"{words[: -len(' or null')]} {limits}, or null"
    return f"{words} {limits}"


def in_range(value: Any, meta: dict) -> bool:
    if value is None:
        return True
    if isinstance(value, list | dict):
        return all(in_range(v, meta) for v in (value.values() if isinstance(value, dict) else value))
    if meta.get("choices") is not None and value not in meta["choices"]:
        return False
    checks = (("ge", lambda v, b: v >= b), ("gt", lambda v, b: v > b), ("le", lambda v, b: v <= b),
              ("lt", lambda v, b: v < b))  # fmt: skip
    return all(meta.get(key) is None or test(value, meta[key]) for key, test in checks)


def range_problem(key: str, value: Any, field: dataclasses.Field, annotation: Any) -> str | None:
    """The message for a key whose value lies outside its declared limits, or None when it lies within them."""
    if "doc" not in field.metadata or in_range(value, field.metadata):
        return None
    return (f"{key}={format_value(value)} is out of range: {key} takes {accepted(field, annotation)} "
            f"({field.metadata['doc']})")


def check_ranges(obj: Any, prefix: str = "") -> list[str]:
    """One message per key of a (nested) config dataclass whose value lies outside its declared limits."""
    problems = []
    annotations = hints(type(obj))
    for field in dataclasses.fields(obj):
        value, key = getattr(obj, field.name), f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            problems += check_ranges(value, key + ".")
        elif (problem := range_problem(key, value, field, annotations[field.name])) is not None:
            problems.append(problem)
    return problems


def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def documented_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, annotation) of every documented leaf key of a config dataclass, depth first."""
    out = []
    annotations = hints(cls)
    for field in dataclasses.fields(cls):
        annotation = annotations[field.name]
        if dataclasses.is_dataclass(annotation):
            out += documented_fields(annotation, f"{prefix}{field.name}.")
        elif "doc" in field.metadata:  # not the group slots (algo, env, reward): their keys are the group's
            out.append((f"{prefix}{field.name}", field, annotation))
    return out

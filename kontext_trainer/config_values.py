"""How a configuration value may be written, and what it becomes: the one place that reads booleans, numbers,
optionals and choices from config files and from `--set key=value` text.

In: a value as a config file (JSON/TOML/YAML) or the command line gives it (often text) and the type a field
declares. Out: the typed value, or one error message naming the field. Shared by `kontext_trainer.config` (our own
keys) and `kontext_trainer.compat` (SimpleTuner's boolean keys), which must not import each other both ways.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
NONE_WORDS = ("", "none", "null")


def parse_bool(value: Any) -> bool | None:
    """`value` as a boolean: a JSON/TOML/YAML boolean, or text such as true/false, yes/no, on/off, 1/0 (any case).
    None when it is none of these."""
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in TRUE_WORDS:
        return True
    if s in FALSE_WORDS:
        return False
    return None


def _number(tp: type, value: Any) -> int | float:
    """`value` as an int or a float; ValueError when it is not one (a boolean is not a number here)."""
    if isinstance(value, bool):
        raise ValueError
    if tp is float:
        return float(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    return value if isinstance(value, int) else int(str(value).strip())


def coerce_value(name: str, tp: Any, value: Any, minimum: float | None = None,
                 maximum: float | None = None) -> tuple[Any, str | None]:
    """`value` converted to the declared type `tp` (bool, int, float, str, a Literal of choices, `X | None`, or any
    other type, taken as it is) and checked against `minimum`/`maximum`: (value, None), or (None, the message).
    For `X | None`, empty text, "none" and "null" are None."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            return None, None
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        v = str(value).strip()
        if v not in args:
            return None, f"{name}: {value!r} is not one of {', '.join(repr(a) for a in args if a)}"
        return v, None
    if tp is bool:
        b = parse_bool(value)
        return (b, None) if b is not None else (None, f"{name}: {value!r} is not a boolean (true/false)")
    try:
        if tp in (int, float):
            v = _number(tp, value)
        elif tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            v = str(value)
        else:  # tuples and tables arrive parsed (config's own value forms)
            v = value
    except (TypeError, ValueError):
        return None, f"{name}: {value!r} is not a valid {getattr(tp, '__name__', tp)}"
    if minimum is not None and v < minimum:
        return None, f"{name}: {v} is below the minimum {minimum}"
    if maximum is not None and v > maximum:
        return None, f"{name}: {v} is above the maximum {maximum}"
    return v, None

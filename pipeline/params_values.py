"""Checking the values of a YAML mapping against what a typed field expects, with errors
that name the key, what was found, and how to write it.

params.yaml is read through :mod:`weightlapse.pipeline.safe_yaml` first; these checks
then turn its plain values into the typed params of :mod:`weightlapse.pipeline.params`, and
:func:`refuse_twins` refuses two runs of those params that would train the same trajectory.
"""

from __future__ import annotations

import itertools
from typing import Any

from weightlapse.pipeline.safe_yaml import shown


class ParamsError(ValueError):
    """params.yaml holds a key or value that the pipeline cannot use."""


def coerce(value: Any, type_name: str, key: str) -> Any:
    """Check a YAML value against a field's annotation (given as a string)."""
    if type_name == "int | None" and value is None:
        return None
    if type_name in ("int", "int | None"):
        if isinstance(value, bool) or not isinstance(value, int):
            # YAML 1.1 reads 1e9 (no dot) as text, and 1e9 with a dot is a float: neither is a count.
            hint = "; write it in digits, e.g. 1000000 for 1e6" if isinstance(value, (str, float)) else ""
            raise ParamsError(f"{key}: expected a whole number, got {shown(value)}{hint}")
        return value
    if type_name == "float":
        # YAML 1.1 reads "1e-3" (no dot) as text; accept it as a number. A boolean is not one.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except (ValueError, OverflowError):
                pass
        raise ParamsError(f"{key}: expected a number, got {shown(value)}")
    if type_name == "tuple[int, ...]":  # a list of whole numbers, e.g. hidden: [128, 64]
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list of whole numbers, e.g. [32] (or [] for none), got {shown(value)}")
        return tuple(coerce(item, "int", f"{key}[{index}]") for index, item in enumerate(value))
    if type_name in ("bool", "str"):
        if not isinstance(value, bool if type_name == "bool" else str):
            expected = "true or false" if type_name == "bool" else "a string"
            raise ParamsError(f"{key}: expected {expected}, got {shown(value)}")
        return value
    raise AssertionError(f"unhandled field type {type_name}")  # a programming error, not input


def check_run_name(name: str) -> None:
    """Run names become directory names under runs/: keep them plain."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    if not name or len(name) > 100 or name.startswith(".") or not set(name) <= allowed:
        raise ParamsError(f"runs: {shown(name)} is not a usable run name; use 1-100 letters, digits, '-', '_' "
                          "or '.', not starting with '.'")


def check_positive(key: str, value: int) -> None:
    if value < 1:
        raise ParamsError(f"{key}: must be at least 1, got {value}")


def require_mapping(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ParamsError(f"{where}: expected a mapping of keys to values, got {shown(value)}")


def reject_unknown(raw: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(map(str, raw)) - known)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {listed(unknown)}; known keys: {', '.join(sorted(known))}")


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def listed(names, *, limit: int = 10) -> str:
    names = [shown(name, quote=False) for name in itertools.islice(names, limit + 1)]
    return (", ".join(names[:limit]) + (", ..." if len(names) > limit else "")) if names else "(none)"


def refuse_twins(params) -> None:
    """Refuse two runs of ``params`` (a pipeline.params.Params) that would train the same
    trajectory under two names.

    Everything but the name decides a run's trajectory (every training param and the
    dataset), so two such runs cost twice the training and storage for one result, and
    count twice in a seed group's spread and similarity.
    """
    seen: dict[tuple, str] = {}
    for name, config in params.all_runs.items():
        identity = (params.run_datasets[name], repr(config.to_dict()))  # to_dict: no activation without layers
        twin = seen.setdefault(identity, name)
        if twin != name:
            raise ParamsError(f"{_describe(params, twin)} and {_describe(params, name)} have the same params and "
                              f"dataset, so they would train the same run twice; {_twin_fix(params, twin, name)}")


def _describe(params, name: str) -> str:
    return f"runs.{name}" if name in params.runs else f"sweep point {name}"


def _twin_fix(params, first: str, second: str) -> str:
    listed = [name for name in (first, second) if name in params.runs]
    if len(listed) == 1:
        return f"remove runs.{listed[0]} (the sweep trains it as {({first, second} - set(listed)).pop()}) or change one of its params"
    return "remove one of them or change one of its params"

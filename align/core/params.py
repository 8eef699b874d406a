"""Turning a config section into the keyword arguments of a component factory.

Config is data: values are checked against the factory's annotations and converted only where the
conversion is lossless and obvious. One rule for numbers written as strings: wherever a number is
expected, a string that reads whole as one is that number (``"5e-7"`` to ``5e-07``, which YAML reads
as a string unless it has a dot; ``"3"`` to ``3`` for an integer too); ``align validate`` shows the
number. An integer setting is at most :data:`MAX_INT` in size (``max_steps: 1e30`` is refused).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from align.errors import ConfigError, brief, closest

#: The largest integer a setting may hold (int32's): step counts, sizes and lengths never come near
#: it, and the libraries they go to overflow on the likes of 10**30.
MAX_INT = 2**31 - 1


def number_from_string(value: str) -> int | float | None:
    """The number a config string spells whole (``"3"``, ``" 5e-7 "``), or None."""
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


class ParamError(ValueError):
    """Raised by a component for a bad parameter: ``ParamError("beta", "must be > 0 (got -1)")``."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ParamError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ParamError(key, message)


def factory_params(factory: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters a factory takes, or None when it takes ``**kwargs``."""
    try:
        signature = inspect.signature(factory, eval_str=True)
    except (TypeError, ValueError, NameError):
        return None
    params = {}
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            params[name] = param
    return params


def factory_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    """The factory's default parameter values (for printing the resolved plan)."""
    if dataclasses.is_dataclass(factory):
        defaults = {}
        for f in dataclasses.fields(factory):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = _plain(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = _plain(f.default_factory())
        return defaults
    params = factory_params(factory) or {}
    return {name: _plain(p.default) for name, p in params.items() if p.default is not inspect.Parameter.empty}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def build_component(
    factory: Callable[..., Any],
    params: Mapping[str, Any],
    where: str,
    source: str,
    *,
    checks_values: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Check ``params`` against ``factory`` and call it; errors name ``source`` and ``where.key``
    (``key`` alone with an empty ``where``: the config's top-level keys).

    With ``checks_values`` the factory checks and converts every value itself (the run's settings,
    align/core/settings.py, whose messages the error catalogue lists): only unknown and missing keys
    are checked here. Returns the component and the keyword arguments it was built with (converted
    values).
    """

    def path(key: Any) -> str:
        return f"{where}.{key}" if where else str(key)

    check_keys(factory, params, where, source)
    accepted = factory_params(factory)
    kwargs = dict(params)
    if accepted is not None:
        for key, value in params.items():
            annotation = accepted[key].annotation
            if annotation is not inspect.Parameter.empty and not checks_values:
                kwargs[key] = coerce(value, annotation, path(key), source)
    if not checks_values:
        for key, value in kwargs.items():
            _check_finite(value, path(key), source)
    if accepted is not None:
        missing = [
            name
            for name, p in accepted.items()
            if p.default is inspect.Parameter.empty and name not in kwargs
        ]
        if missing:
            raise ConfigError(f"{source}: '{path(missing[0])}' is required; add it to the config")
    try:
        return factory(**kwargs), kwargs
    except ParamError as exc:
        raise ConfigError(f"{source}: {path(exc.key)}: {exc.message}") from None


def check_keys(factory: Callable[..., Any], params: Mapping[str, Any], where: str, source: str) -> None:
    """Refuse a key of ``params`` that ``factory`` does not take, with the closest one it does."""
    accepted = factory_params(factory)
    if accepted is None:
        return
    for key in params:
        if key not in accepted:
            raise ConfigError(
                f"{source}: unknown key '{f'{where}.{key}' if where else key}'{closest(str(key), accepted)} "
                f"(valid: {', '.join(accepted) or 'none'})"
            )


def _check_finite(value: Any, path: str, source: str) -> None:
    """Refuse a NaN or infinite number in any param (a list's items too): ``dpo.beta: .inf`` and
    ``lora.alpha: .nan`` passed every ``> 0`` check there is and trained on NaN; and an integer
    beyond :data:`MAX_INT`."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {path}: must be a finite number (got {value})")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise ConfigError(
            f"{source}: {path}: {value:.3g} is out of range; an integer setting is at most {MAX_INT}"
        )
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, f"{path}[{index}]", source)
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite(item, f"{path}.{key}", source)


def coerce(value: Any, annotation: Any, path: str, source: str) -> Any:
    """Check ``value`` against a type annotation, converting numeric strings to numbers."""
    ok, converted = _coerce(value, annotation)
    if ok:
        return converted
    raise ConfigError(
        f"{source}: {path}: expected {_describe(annotation)}, got {type(value).__name__} {brief(value)}"
    )


def _coerce(value: Any, annotation: Any) -> tuple[bool, Any]:
    if annotation is Any or annotation is object:
        return True, value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, None
    if origin is typing.Literal:
        return (value in args), value
    if annotation is type(None):
        return value is None, None
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, str):
            value = number_from_string(value)
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, None
    if annotation is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, str):
            value = number_from_string(value)
        if isinstance(value, (int, float)):
            return True, float(value)
        return False, None
    if annotation is str:
        return isinstance(value, str), value
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return False, None
        item_type = args[0] if args else Any
        items = []
        for item in value:
            ok, converted = _coerce(item, item_type)
            if not ok:
                return False, None
            items.append(converted)
        return True, (tuple(items) if origin is tuple or annotation is tuple else items)
    if origin in (dict, Mapping) or annotation is dict:
        return isinstance(value, Mapping), value
    return True, value


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin in (list, tuple, typing.Sequence):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))

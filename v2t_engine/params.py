"""EasyNLP's ``--user_defined_parameters``: whitespace-separated ``key=value`` pairs."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_user_defined_parameters(text: str | None, allowed: Iterable[str]) -> dict[str, str]:
    """Split ``'frame_num=4 img_size=224'`` into a dict, rejecting keys v2t does not know.

    Unknown keys are an error rather than silently ignored: a misspelt ``fram_num=4`` would
    otherwise train with the default and waste a run.
    """
    allowed = set(allowed)
    params: dict[str, str] = {}
    for token in (text or "").split():
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"user_defined_parameters: expected key=value, got {token!r}")
        if key not in allowed:
            raise ConfigError(
                f"user_defined_parameters: unknown key {key!r}; known keys: {', '.join(sorted(allowed))}")
        params[key] = value
    return params


def get_int(params: Mapping[str, str], key: str, default: Any = None) -> Any:
    if key not in params:
        return default
    try:
        return int(params[key])
    except ValueError:
        raise ConfigError(f"user_defined_parameters: {key} must be an integer, got {params[key]!r}") from None


def get_bool(params: Mapping[str, str], key: str, default: Any = None) -> Any:
    if key not in params:
        return default
    value = params[key].lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"user_defined_parameters: {key} must be true or false, got {params[key]!r}")

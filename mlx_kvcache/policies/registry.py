"""Policy name -> class. A policy registers itself with `@register` in its own
file; the CLI, the Python API, the benchmarks and cache files all look names up
here, so adding a policy is adding one file to this package."""

import dataclasses
from typing import Dict

from mlx_kvcache.errors import UserError

POLICIES: Dict[str, type] = {}


def register(cls):
    if cls.name in POLICIES:
        raise ValueError(f"policy {cls.name!r} registered twice")
    POLICIES[cls.name] = cls
    return cls


def policy_class(name: str) -> type:
    try:
        return POLICIES[name]
    except KeyError:
        raise UserError(
            f"unknown policy {name!r} (available: {', '.join(sorted(POLICIES))})"
        ) from None


def parameters(cls) -> Dict[str, dataclasses.Field]:
    """A policy's user-settable parameters: its dataclass fields."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def make_cache(model, policy: str = "full", **policy_args) -> list:
    """One cache policy object per layer of `model`, e.g.
    `make_cache(model, "full")`. Unknown or invalid arguments raise UserError.

    The policy runs on the global-attention layers. A sliding-window layer
    (Gemma 3's local layers) keeps its own window: a StreamingLLM cache with no
    sinks is exactly that window."""
    cls = policy_class(policy)
    accepted = parameters(cls)
    for key in policy_args:
        if key not in accepted:
            takes = ", ".join(sorted(accepted)) or "no arguments"
            raise UserError(f"policy {policy!r} takes {takes}; got {key!r}")
    return [cls(**policy_args) if window is None else sliding_window_cache(window)
            for window in sliding_windows(model)]


def sliding_windows(model) -> list:
    """Per layer: its attention window, or None for a global layer. Models
    without `sliding_windows` (mlx-lm's own, through the adapter) are all global."""
    return getattr(model, "sliding_windows", None) or [None] * len(model.layers)


def sliding_window_cache(window: int):
    return POLICIES["streaming"](budget=window, sinks=0)

"""Policy name -> class. A policy registers itself with `@register` in its own
file; the CLI, the Python API, the benchmarks and cache files all look names up
here, so adding a policy is adding one file to this package."""

import copy
import copyreg
import dataclasses
from typing import Dict

import mlx.core as mx

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


def reads_prompts_in_full(policy: str, policy_args: dict) -> bool:
    """Whether the policy reads prompt chunks with full attention over every
    token and keeps them all (full, SnapKV, RefreshKV over an unquantized
    cache): its cache after reading a prompt holds exactly the full cache's
    keys and values, so it can continue from a full cache's reading instead of
    repeating it (tests/test_evaluate.py, tests/test_chat.py)."""
    return policy in ("full", "snapkv") or (
        policy == "refreshkv" and policy_args.get("full_cache_bits") is None)


def take_over(cache: list, full_cache: list) -> None:
    """Give each layer of a fresh `cache` what a full cache's layer holds
    (valid where `reads_prompts_in_full`)."""
    for layer, full in zip(cache, full_cache):
        layer.state = full.state
        layer.offset = full.offset


def reads_prompts_at_any_budget(policy: str) -> bool:
    """Whether the policy's cache after reading a prompt is the same whatever
    its budget (H2O cuts only at single-token steps): one prefill then serves
    every budget (`with_budget`)."""
    return getattr(policy_class(policy), "reads_prompts_at_any_budget", False)


def with_budget(cache: list, model, policy: str, **policy_args) -> list:
    """`policy`'s cache made with `policy_args`, holding a copy of what `cache`,
    the same policy prefilled under another budget, holds (valid where
    `reads_prompts_at_any_budget`)."""
    if not reads_prompts_at_any_budget(policy):
        raise ValueError(f"{policy}'s prefilled cache depends on its budget")
    rebudgeted = make_cache(model, policy, **policy_args)
    take_over(rebudgeted, fork(cache))
    return rebudgeted


def fork(cache: list) -> list:
    """An independent copy of `cache` (any policy): go on from a prefilled
    cache more than once without reading the prompt again."""
    return copy.deepcopy(cache)


def _dtype_named(name: str) -> mx.Dtype:
    return getattr(mx, name)


# Policies keep the dtype of what they decode to; MLX's Dtype objects cannot
# be pickled, so copy.deepcopy would fail on them: they copy as themselves.
copyreg.pickle(mx.Dtype, lambda dtype: (_dtype_named, (str(dtype).rsplit(".", 1)[1],)))

"""Token budgets shared by the budgeted policies: a fixed number of tokens, or a
fraction of the context as it is NOW, never below a floor.

A ratio resolved once against the prompt starves every chat and every short
prompt (38 prompt tokens at 1/8 kept 5 tokens for the whole generation), so a
ratio is resolved again each time a policy chooses (RefreshKV at each step,
SnapKV at each prompt's end, H2O/mixed at each eviction, streaming per
position), and while the context is at most `--min-budget` tokens a budgeted
policy keeps and attends to everything: exactly full attention.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

from mlx_kvcache.errors import UserError

# The papers' L/8 (RefreshKV, SnapKV at 32K), measured here on long prompts:
# docs/benchmarks.md, fidelity tables.
DEFAULT_BUDGET_RATIO = 1 / 8
# Read off the growing-context table (benchmarks/growing_context.py,
# docs/long_context.md, "Budgets that grow: where the floor comes from").
DEFAULT_MIN_BUDGET = 256


@dataclass
class Budget:
    """Tokens a policy keeps (or selects) per layer and KV head."""

    tokens: Optional[int]  # fixed, or None for a ratio
    ratio: float
    floor: int

    def at(self, context: int) -> int:
        """The budget when the context holds `context` tokens."""
        if self.tokens is not None:
            return self.tokens
        return max(self.floor, math.ceil(self.ratio * context))

    @property
    def least(self) -> int:
        """The smallest budget this rule ever gives."""
        return self.tokens if self.tokens is not None else max(self.floor, 1)


def budget_rule(policy: str, budget: Optional[int], budget_ratio: Optional[float],
                min_budget: Optional[int]) -> Budget:
    """Validate a policy's budget flags (errors name `policy`, the one the user
    asked for) and return its rule; with neither flag, the default ratio."""
    if budget is not None and budget_ratio is not None:
        raise UserError(f"{policy}: give --budget or --budget-ratio, not both")
    if budget is not None and min_budget is not None:
        raise UserError(f"{policy}: --min-budget is the floor of a --budget-ratio; "
                        f"--budget {budget} is already a fixed number of tokens")
    if budget is not None and budget < 1:
        raise UserError(f"{policy}: --budget must be >= 1, got {budget}")
    if budget_ratio is not None and not 0 < budget_ratio <= 1:
        raise UserError(f"{policy}: --budget-ratio must be in (0, 1], got {budget_ratio}")
    if min_budget is not None and min_budget < 0:
        raise UserError(f"{policy}: --min-budget must be >= 0, got {min_budget}")
    return Budget(
        tokens=budget,
        ratio=DEFAULT_BUDGET_RATIO if budget_ratio is None else budget_ratio,
        floor=DEFAULT_MIN_BUDGET if min_budget is None else min_budget,
    )


# The three flags, declared once for every budgeted policy's dataclass (each
# class needs its own Field objects, hence functions).
def budget_field():
    return field(default=None, metadata={
        "parse": int, "help": "tokens kept (or selected) per layer and KV head, fixed"})


def budget_ratio_field():
    return field(default=None, metadata={
        "parse": float, "help": f"budget as a fraction of the context so far, resolved "
                                f"again as it grows (default {DEFAULT_BUDGET_RATIO:g})"})


def min_budget_field():
    return field(default=None, metadata={
        "parse": int, "help": f"floor of a ratio budget: up to this many tokens of "
                              f"context, everything is kept (default {DEFAULT_MIN_BUDGET})"})

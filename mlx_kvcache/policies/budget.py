"""Budgets given as tokens or as a fraction of the prompt, shared by the policies."""

import math
from typing import Optional

from mlx_kvcache.errors import UserError


def check_budget(policy: str, budget: Optional[int], budget_ratio: Optional[float],
                 default_ratio: Optional[float] = None) -> None:
    if budget is not None and budget_ratio is not None:
        raise UserError(f"{policy}: give --budget or --budget-ratio, not both")
    if budget is None and budget_ratio is None and default_ratio is None:
        raise UserError(f"{policy} needs --budget N (tokens) or --budget-ratio R")
    if budget is not None and budget < 1:
        raise UserError(f"{policy}: --budget must be >= 1, got {budget}")
    if budget_ratio is not None and not 0 < budget_ratio <= 1:
        raise UserError(f"{policy}: --budget-ratio must be in (0, 1], got {budget_ratio}")


def resolve_budget(budget: Optional[int], budget_ratio: Optional[float],
                   prompt_tokens: int, default_ratio: Optional[float] = None) -> int:
    """Tokens to keep for a prompt of `prompt_tokens` tokens."""
    if budget is not None:
        return budget
    ratio = budget_ratio if budget_ratio is not None else default_ratio
    return max(1, math.ceil(ratio * prompt_tokens))

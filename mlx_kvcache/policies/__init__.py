"""Cache policies, one class per file, found by name in the registry."""

import importlib
import pkgutil

from .protocol import trimmable
from .registry import (POLICIES, fork, make_cache, parameters, policy_class,
                       reads_prompts_at_any_budget, reads_prompts_in_full, take_over,
                       with_budget)

# Importing each policy file registers its class.
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("protocol", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["POLICIES", "fork", "make_cache", "parameters", "policy_class",
           "reads_prompts_at_any_budget", "reads_prompts_in_full", "take_over", "trimmable",
           "with_budget"]

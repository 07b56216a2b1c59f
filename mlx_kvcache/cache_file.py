"""Save a whole cache (every layer, any policy) to one safetensors file and
restore it, refusing a different model or policy.

Arrays come from each policy's `state`; its scalar attributes (offsets,
counters, budgets resolved at run time) go into the file's metadata as JSON, so
every registered policy saves and restores without code of its own.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_kvcache.errors import UserError
from mlx_kvcache.files import replaced_atomically
from mlx_kvcache.policies import policy_class
from mlx_kvcache.policies.registry import sliding_windows

FORMAT = "mlx_kvcache.cache/2"  # 2: each layer names its policy
FORMAT_1 = "mlx_kvcache.cache/1"


def model_identity(model) -> dict:
    """The model's shape plus a fingerprint of its weights: the norms (never
    quantized) and a few embedding rows rounded to float16, so a quantized and
    a dequantized load of one model agree."""
    args = model.args
    weights = [model.model.norm.weight] + [layer.input_layernorm.weight for layer in model.layers]
    weights.append(model.model.embed_tokens(mx.arange(8)))
    digest = hashlib.sha256()
    for weight in weights:
        digest.update(np.array(weight.astype(mx.float16)).tobytes())
    return {
        "model_type": args.model_type, "layers": len(model.layers),
        "hidden_size": args.hidden_size, "kv_heads": args.num_key_value_heads,
        "vocab_size": args.vocab_size, "weights": digest.hexdigest()[:16],
    }


def _scalars(obj) -> dict:
    out = {}
    for key, value in vars(obj).items():
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[key] = {"__nested__": _scalars(value)}
    return out


def _restore_scalars(obj, scalars: dict) -> None:
    for key, value in scalars.items():
        if isinstance(value, dict) and "__nested__" in value:
            _restore_scalars(getattr(obj, key), value["__nested__"])
        else:
            setattr(obj, key, value)


def _params(layer) -> dict:
    return {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}


def _record(layer) -> dict:
    return {"policy": layer.name, "params": _params(layer), "scalars": _scalars(layer)}


def _rebuild(record: dict, state: dict):
    layer = policy_class(record["policy"])(**record["params"])
    if state:
        layer.state = state
    _restore_scalars(layer, record["scalars"])
    return layer


def snapshot(cache: list) -> list:
    """What `restore` needs to rebuild `cache` as it is now. Cheap: MLX arrays
    are values, so the state is referenced, not copied, and later updates to
    the cache leave the snapshot as it was."""
    return [(_record(layer), dict(layer.state)) for layer in cache]


def restore(saved: list) -> list:
    """A new cache equal to the one `snapshot` was taken of."""
    return [_rebuild(record, state) for record, state in saved]


def save_cache(path, cache: list, model, extra: dict = None) -> None:
    """Write `cache` (from make_cache) atomically: a crash leaves the old file.
    The header names the policy of the global layers; each layer also records
    its own (a sliding-window layer's window is a streaming cache). `extra`:
    JSON the caller gets back from read_cache (a chat session's history)."""
    policy = next(layer for layer, window in zip(cache, sliding_windows(model))
                  if window is None)
    arrays = {}
    for i, layer in enumerate(cache):
        for name, array in layer.state.items():
            arrays[f"{i}.{name}"] = array
    header = {
        "format": FORMAT, "policy": policy.name, "params": _params(policy),
        "model": model_identity(model), "layers": [_record(layer) for layer in cache],
        "extra": extra,
    }
    path = Path(path)
    directory = path.resolve().parent
    if not directory.is_dir():
        raise UserError(f"cannot write {path}: no directory {directory}")
    try:
        with replaced_atomically(path, ".safetensors") as tmp:
            mx.save_safetensors(tmp, arrays, metadata={"mlx_kvcache": json.dumps(header)})
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None


def load_cache(path, model, policy: str = None) -> list:
    """The cache saved in `path`, for `model`. If `policy` is given, a file
    of another policy is refused."""
    return read_cache(path, model, policy)[0]


def read_cache(path, model, policy: str = None):
    """(the cache saved in `path` for `model`, the `extra` saved with it)."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        header = json.loads(metadata["mlx_kvcache"])
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a saved mlx-kvcache cache ({e})") from None
    if header.get("format") == FORMAT_1:
        # Version 1: one policy for every layer, each layer's scalars alone.
        header["layers"] = [{"policy": header["policy"], "params": header["params"],
                             "scalars": scalars} for scalars in header["layers"]]
    elif header.get("format") != FORMAT:
        raise UserError(f"{path}: unknown cache format {header.get('format')!r}")
    expected = model_identity(model)
    if header["model"] != expected:
        raise UserError(
            f"{path} was saved from another model ({header['model']['model_type']}, "
            f"weights {header['model']['weights']}); this one is "
            f"{expected['model_type']}, weights {expected['weights']}"
        )
    if policy is not None and policy != header["policy"]:
        raise UserError(f"{path} holds a {header['policy']!r} cache, not {policy!r}")
    if len(header["layers"]) != len(model.layers):
        raise UserError(f"{path}: {len(header['layers'])} layers saved, the model has "
                        f"{len(model.layers)}")
    cache = []
    for i, record in enumerate(header["layers"]):
        prefix = f"{i}."
        state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        try:
            cache.append(_rebuild(record, state))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: layer {i} cannot be restored ({e})") from None
    return cache, header.get("extra")

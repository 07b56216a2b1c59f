"""Save a whole cache (every layer, any policy) to one safetensors file and
restore it, refusing a different model or policy.

Arrays come from each policy's `state`; its scalar attributes (offsets,
counters, budgets resolved at run time) go into the file's metadata as JSON, so
every registered policy saves and restores without code of its own.

A sharded model's cache is saved as one file per rank, each its own KV heads
(`shard_path`), and restored only onto the same number of ranks. The ranks
agree before they go on: a new set of shards replaces the old one only once
every rank has written its own, and a restore from shards of different saves
is refused.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_kvcache.distributed import everyone, rank0_int, same_everywhere
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
    identity = {
        "model_type": args.model_type, "layers": len(model.layers),
        "hidden_size": args.hidden_size, "kv_heads": args.num_key_value_heads,
        "vocab_size": args.vocab_size, "weights": digest.hexdigest()[:16],
    }
    if model.shard_group is not None:
        identity["shard"] = [model.shard_group.rank(), model.shard_group.size()]
    return identity


def shard_path(path, model) -> Path:
    """Where this process's part of the cache saved as `path` is: `path`
    itself for one process and for rank 0, `path.rankN` for rank N (ranks on
    one machine share its directories)."""
    path, group = Path(path), model.shard_group
    if group is None or group.rank() == 0:
        return path
    return path.with_name(f"{path.name}.rank{group.rank()}")


def _shard_mismatch(path, saved, here) -> str:
    def holds(shard):
        return f"shard {shard[0] + 1} of {shard[1]}"

    if saved is None:
        return (f"{path} was saved by one process; this one holds {holds(here)} of the model: "
                "restore it without mlx.launch")
    if here is None:
        return (f"{path} holds {holds(saved)} of a sharded cache: restore it under "
                f"mlx.launch -n {saved[1]}")
    return f"{path} holds {holds(saved)}, this process {holds(here)}: restore it over {saved[1]} ranks"


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
    group = model.shard_group
    if group is not None:
        # Which save each rank's shard comes from, checked on restore.
        header["save_id"] = rank0_int(group, int.from_bytes(os.urandom(4), "little") >> 1)
    path = shard_path(path, model)
    directory = path.resolve().parent
    problem = None
    if not directory.is_dir():
        problem = f"no directory {directory}"
    elif not os.access(directory, os.W_OK | os.X_OK):
        problem = f"{directory} is not writable"
    other_rank = "another rank could not write its shard (its error says why)"
    if not everyone(group, problem is None):
        raise UserError(f"cannot write {path}: {problem or other_rank}")
    try:
        with replaced_atomically(path, ".safetensors") as tmp:
            try:
                mx.save_safetensors(tmp, arrays, metadata={"mlx_kvcache": json.dumps(header)})
            except OSError as e:
                problem = str(e)
            # Sharded, a rank's file is replaced only once every rank has
            # written its new one: a failure anywhere leaves all the old ones.
            if not everyone(group, problem is None):
                raise UserError(f"cannot write {path}: {problem or other_rank}")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None


def load_cache(path, model, policy: str = None) -> list:
    """The cache saved in `path`, for `model`. If `policy` is given, a file
    of another policy is refused."""
    return read_cache(path, model, policy)[0]


def read_cache(path, model, policy: str = None):
    """(the cache saved in `path` for `model`, the `extra` saved with it).
    Sharded, each rank reads its own shard; all succeed or all refuse."""
    group = model.shard_group
    given, path = path, shard_path(path, model)
    problem, cache, extra, save_id = None, None, None, None
    try:
        cache, extra, save_id = _read(path, model, policy)
    except UserError as e:
        problem = e
    if not everyone(group, problem is None):
        raise problem or UserError(f"{path}: another rank could not read its shard of the "
                                   "cache (its error says why)")
    if not same_everywhere(group, save_id or 0):
        raise UserError(f"{given}: the ranks' shards come from different saves (one was "
                        "interrupted); save the session again")
    return cache, extra


def _read(path: Path, model, policy):
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
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
    saved_shard, shard = header["model"].pop("shard", None), expected.pop("shard", None)
    if header["model"] == expected and saved_shard != shard:
        raise UserError(_shard_mismatch(path, saved_shard, shard))
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
    return cache, header.get("extra"), header.get("save_id")

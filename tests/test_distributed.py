"""The model sharded over MLX's ring backend, ranks as local processes on
127.0.0.1 (`mlx.launch -n 2 --backend ring`): the tokens of one process, its
logits within a stated tolerance, each rank holding its own KV heads and
choosing for them what one process chooses; one line for what cannot shard."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import sharded_run

LAUNCH = Path(sys.executable).parent / "mlx.launch"
# Sums across ranks reorder floating point: float32 logits of order 10.
LOGIT_TOLERANCE = 1e-3


def launch(ranks, *command, timeout=420):
    return subprocess.run([str(LAUNCH), "-n", str(ranks), "--backend", "ring", *command],
                          capture_output=True, text=True, timeout=timeout, env=os.environ,
                          stdin=subprocess.DEVNULL, cwd=Path(__file__).parent.parent)


@pytest.fixture(scope="module")
def qwen():
    from mlx_kvcache import load

    return load(sharded_run.MODEL)


def test_qwen_over_two_ranks_computes_what_one_process_computes(qwen, tmp_path):
    alone = sharded_run.run(*qwen)
    done = launch(2, sys.executable, "-m", "tests.sharded_run", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank1.json"], (
        done.stderr)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        drift = np.abs(np.array(rank["last_logits"]) - np.array(alone["last_logits"])).max()
        assert drift < LOGIT_TOLERANCE, (rank["rank"], drift)
        for policy in ("full", "refreshkv"):
            assert rank[policy]["tokens"] == alone[policy]["tokens"], policy
        # Qwen2.5-Coder's 2 KV heads: one a rank, chosen as one process chose it.
        for layer, (mine, whole) in enumerate(zip(rank["refreshkv"]["retained"],
                                                  alone["refreshkv"]["retained"])):
            assert mine == [whole[rank["rank"]]], layer
    # Half the cache a rank, but for RefreshKV's head-averaged query of its
    # last refresh (64 floats a layer), which each rank holds whole.
    assert ranks[0]["full"]["kv_bytes"] * 2 == alone["full"]["kv_bytes"]
    assert ranks[0]["refreshkv"]["kv_bytes"] * 2 - 24 * 64 * 4 == alone["refreshkv"]["kv_bytes"]


def test_the_cli_under_mlx_launch_refuses_heads_that_do_not_divide():
    # SmolLM2: 9 query and 3 KV heads. Every rank says why, rank 0 prints nothing else.
    done = launch(2, sys.executable, "-m", "mlx_kvcache.generate", "--prompt", "hi",
                  "--max-tokens", "2")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and set(errors) == {
        "error: cannot shard this model over 2 ranks: 9 query heads, 3 KV heads do not "
        "divide by 2"}
    assert "Traceback" not in done.stderr and done.stdout.strip() == ""

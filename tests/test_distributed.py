"""The model sharded over MLX's ring backend, ranks as local processes on
127.0.0.1 (`mlx.launch -n 2 --backend ring`): the same text as one process,
each rank holding its own KV heads, and one line for what cannot shard."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(sys.executable).parent / "mlx.launch"
PROMPT = "Write a Python function that returns the square of x."


def generate(*args, ranks=None, timeout=420):
    command = [sys.executable, "-m", "mlx_kvcache.generate", *args]
    if ranks:
        command = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=os.environ, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("policy", [["--policy", "full"],
                                    ["--policy", "refreshkv", "--budget", "16"]],
                         ids=lambda p: p[1])
def test_qwen_over_two_ranks_writes_what_one_process_writes(tmp_path, policy):
    args = ["--model", "qwen2.5-coder-0.5b", "--prompt", PROMPT, "--max-tokens", "20",
            *policy]
    alone = generate(*args, "--stats-json", str(tmp_path / "alone.json"))
    sharded = generate(*args, "--stats-json", str(tmp_path / "sharded.json"), ranks=2)
    assert alone.returncode == 0, alone.stderr
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == alone.stdout and len(alone.stdout.split()) >= 10
    assert "sharded over 2 ranks" in sharded.stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("alone", "sharded"))
    # Each rank holds 1 of the 2 KV heads: half the cache, but for RefreshKV's
    # head-averaged query of its last refresh (64 floats a layer), which each
    # rank holds whole.
    replicated = 24 * 64 * 4 if "refreshkv" in policy else 0
    assert two["ranks"] == 2 and two["kv_bytes"] * 2 - replicated == one["kv_bytes"]
    assert two["policy_stats"] == one["policy_stats"]


def test_head_counts_that_do_not_divide_are_refused_in_one_line():
    done = generate("--prompt", "hi", "--max-tokens", "2", ranks=2)  # SmolLM2: 9 and 3 heads
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and set(errors) == {
        "error: cannot shard this model over 2 ranks: 9 query heads, 3 KV heads do not "
        "divide by 2"}
    assert "Traceback" not in done.stderr and done.stdout.strip() == ""

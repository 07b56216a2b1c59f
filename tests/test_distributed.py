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


def launch(ranks, *command, timeout=420, input=None):
    """`command` over `ranks` local ranks (run alone for one rank)."""
    if ranks > 1:
        command = (str(LAUNCH), "-n", str(ranks), "--backend", "ring", *command)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=os.environ, cwd=Path(__file__).parent.parent, input=input,
                          stdin=subprocess.DEVNULL if input is None else None)


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
    # What crosses ranks in a decode step: the model's two all-sums per layer
    # of the token's hidden state (896 floats) under every policy; RefreshKV
    # adds its schedule's head-dim mean (64 floats) per layer that checks.
    from mlx_kvcache.policies import POLICIES

    layers, hidden, head_dim = 24, 896, 64
    for rank in ranks:
        assert set(rank["collectives"]) == set(POLICIES)
        for policy, sent in rank["collectives"].items():
            if policy != "refreshkv":
                assert sent == {"calls": 2 * layers, "bytes": 2 * layers * hidden * 4}, policy
        sent = rank["collectives"]["refreshkv"]
        extra = sent["calls"] - 2 * layers
        assert 0 < extra <= layers and (
            sent["bytes"] - 2 * layers * hidden * 4 == extra * head_dim * 4), sent
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


def test_a_chat_over_three_ranks_says_what_one_process_says_and_its_session_survives(tmp_path):
    # SmolLM2: 9 query heads, 3 KV heads, 1,536 neurons: one KV head a rank.
    common = ["--policy", "refreshkv", "--budget", "16", "--max-tokens", "16"]
    questions = ["What is the capital of France?", "Name a river there.", "Another?"]

    def chat(ranks, *args, stdin):
        # mlx.launch never passes the end of its input on: a sharded chat ends
        # with /exit.
        stdin += "/exit\n"
        return launch(ranks, sys.executable, "-m", "mlx_kvcache.chat", *common, *args,
                      timeout=300, input=stdin)

    alone = chat(1, stdin="\n".join(questions) + "\n")
    assert alone.returncode == 0, alone.stderr
    session = tmp_path / "chat.session"
    first = chat(3, "--session", str(session), stdin="\n".join(questions[:2]) + "\n")
    shards = sorted(p.name for p in tmp_path.iterdir())
    assert shards == ["chat.session", "chat.session.rank1", "chat.session.rank2"], first.stderr
    older_rank2 = (tmp_path / "chat.session.rank2").read_bytes()
    second = chat(3, "--session", str(session), stdin=questions[2] + "\n")
    # Rank 0 alone prints: the replies once, as one process writes them.
    assert first.stdout + second.stdout == alone.stdout, (first.stderr, second.stderr)
    assert second.stderr.count("restored") == 1

    # One shard from an earlier save: every rank refuses, in one line each.
    (tmp_path / "chat.session.rank2").write_bytes(older_rank2)
    mixed = chat(3, "--session", str(session), stdin="hi\n")
    errors = {line for line in mixed.stderr.splitlines() if line.startswith("error:")}
    assert errors == {f"error: {session}: the ranks' shards come from different saves (one "
                      "was interrupted); save the session again"}, mixed.stderr
    assert mixed.stdout.strip() == "" and "Traceback" not in mixed.stderr
    # Rank 0's file alone is not a session one process can restore.
    one = chat(1, "--session", str(session), stdin="hi\n")
    assert one.returncode == 1 and one.stderr.strip() == (
        f"error: {session} holds shard 1 of 3 of a sharded cache: restore it under "
        "mlx.launch -n 3")

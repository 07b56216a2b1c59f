"""The model sharded over MLX's ring backend, ranks as local processes on
127.0.0.1 (`mlx.launch -n 2 --backend ring`): the tokens of one process, its
logits within a stated tolerance, each rank holding its own KV heads and
choosing for them what one process chooses; one line for what cannot shard."""

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests import sharded_run

LAUNCH = Path(sys.executable).parent / "mlx.launch"
ROOT = Path(__file__).parent.parent
# Sums across ranks reorder floating point: float32 logits of order 10.
LOGIT_TOLERANCE = 1e-3


def launch(ranks, *command, timeout=420):
    """`command` under `mlx.launch -n ranks --backend ring`, as users run it."""
    return subprocess.run((str(LAUNCH), "-n", str(ranks), "--backend", "ring", *command),
                          capture_output=True, text=True, timeout=timeout, env=os.environ,
                          cwd=ROOT, stdin=subprocess.DEVNULL)


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def ranks_run(ranks, *command, tmp_path, timeout=420, input=""):
    """Each rank's (returncode, stdout, stderr): `command` as `ranks` processes
    on 127.0.0.1 with the environment mlx.launch's ring backend gives them (a
    hostfile, MLX_RANK), each fed `input`, or alone for one rank. Not through
    mlx.launch itself: its reader threads spin on the ranks' always-writable
    stdin pipes and take a core of CI's two from the ranks (the sharding is
    ours, the launcher is MLX's: the refusal test runs under it)."""
    env = dict(os.environ)
    if ranks > 1:
        # Each rank's OpenBLAS would start a thread per core and spin it between
        # calls: ranks x cores spinning threads on CI's two cores.
        env["OPENBLAS_NUM_THREADS"] = "1"
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(ranks)]))
        env["MLX_HOSTFILE"] = str(hostfile)
    stdin = tmp_path / "stdin.txt"
    stdin.write_text(input)
    runs = []
    for rank in range(ranks):
        out, err = (tmp_path / f"rank{rank}.{kind}" for kind in ("out", "err"))
        with open(stdin) as i, open(out, "w") as o, open(err, "w") as e:
            runs.append((subprocess.Popen(command, stdin=i, stdout=o, stderr=e, cwd=ROOT,
                                          env={**env, "MLX_RANK": str(rank)}), out, err))
    deadline = time.monotonic() + timeout
    while any(process.poll() is None for process, _, _ in runs):
        # A rank that failed leaves the others waiting in a collective.
        failed = any(process.poll() not in (None, 0) for process, _, _ in runs)
        if failed or time.monotonic() > deadline:
            for process, _, _ in runs:
                process.kill()
        time.sleep(0.2)
    return [(process.returncode, out.read_text(), err.read_text()) for process, out, err in runs]


def test_qwen_over_two_ranks_computes_what_one_process_computes(qwen, tmp_path):
    alone = sharded_run.run(*qwen)
    reports = tmp_path / "reports"
    reports.mkdir()
    done = ranks_run(2, sys.executable, "-m", "tests.sharded_run", str(reports),
                     tmp_path=tmp_path)
    assert [code for code, _, _ in done] == [0, 0], [err for _, _, err in done]
    assert sorted(p.name for p in reports.iterdir()) == ["rank0.json", "rank1.json"]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
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
    common = ["--policy", "refreshkv", "--budget", "16", "--max-tokens", "8"]
    questions = ["What is the capital of France?", "Name a river there.", "Another?"]

    runs = itertools.count()

    def chat(ranks, *args, stdin):
        # Under mlx.launch a sharded chat ends with /exit: the launcher never
        # passes the end of its input on.
        logs = tmp_path / f"run{next(runs)}"
        logs.mkdir()
        return ranks_run(ranks, sys.executable, "-m", "mlx_kvcache.chat", *common, *args,
                         tmp_path=logs, timeout=300, input=stdin + "/exit\n")

    session = tmp_path / "sessions" / "chat.session"
    session.parent.mkdir()
    [alone] = chat(1, stdin="\n".join(questions) + "\n")
    assert alone[0] == 0, alone[2]
    first = chat(3, "--session", str(session), stdin="\n".join(questions[:2]) + "\n")
    shards = sorted(p.name for p in session.parent.iterdir())
    assert shards == ["chat.session", "chat.session.rank1", "chat.session.rank2"], first
    older_rank2 = (session.parent / "chat.session.rank2").read_bytes()
    second = chat(3, "--session", str(session), stdin=questions[2] + "\n")
    # Rank 0 alone prints: the replies once, as one process writes them.
    assert [code for code, _, _ in first + second] == [0] * 6, (first, second)
    assert first[0][1] + second[0][1] == alone[1], (first, second)
    assert all(out == "" for _, out, _ in first[1:] + second[1:])
    assert [err.count("restored") for _, _, err in second] == [1, 0, 0]

    # One shard from an earlier save: every rank refuses, in one line each.
    (session.parent / "chat.session.rank2").write_bytes(older_rank2)
    mixed = chat(3, "--session", str(session), stdin="hi\n")
    for code, out, err in mixed:
        assert code == 1 and out.strip() == "", err
        assert err.strip() == (f"error: {session}: the ranks' shards come from different "
                               "saves (one was interrupted); save the session again"), err
    # Rank 0's file alone is not a session one process can restore.
    [(code, _, err)] = chat(1, "--session", str(session), stdin="hi\n")
    assert code == 1 and err.strip() == (
        f"error: {session} holds shard 1 of 3 of a sharded cache: restore it under "
        "mlx.launch -n 3")

"""`python -m mlx_kvcache.generate`: the main job, and one clear line with a
non-zero exit for every kind of bad input (never a traceback)."""

import json
import os
import struct
import subprocess
import sys

import pytest

from tests.helpers import tiny_model, write_gguf

GPL = "/usr/share/common-licenses/GPL-3"


def run_cli(*args, env=None, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_kvcache.generate", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})},
        input=stdin, timeout=300,
    )


@pytest.fixture
def cli_in_process(main_in_process):
    """The command by its main() in this process (conftest.main_in_process):
    the policy cases below check what it does with each policy."""
    return lambda *args: main_in_process("mlx_kvcache.generate", *args)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_answers_and_writes_stats(tmp_path):
    stats_path = tmp_path / "stats.json"
    result = run_cli("--policy", "full", "--prompt", "What is the capital of France?",
                     "--max-tokens", "12", "--stats-json", str(stats_path))
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "[full] prompt" in result.stderr
    stats = json.loads(stats_path.read_text())
    assert set(stats) == {"model", "policy", "prompt_tokens", "generated_tokens",
                          "prefill_s", "prefill_tok_per_s", "decode_tok_per_s",
                          "kv_bytes", "peak_memory_bytes", "policy_stats"}
    assert stats["model"].endswith(".gguf") and stats["policy"] == "full"
    assert stats["prompt_tokens"] > 10 and 1 <= stats["generated_tokens"] <= 12
    assert stats["prefill_s"] > 0 and stats["prefill_tok_per_s"] > 0
    # 30 layers x 3 KV heads x 64 dims x K and V x float32, in 256-token blocks.
    assert stats["kv_bytes"] == 30 * 2 * 3 * 64 * 4 * 256
    assert stats["peak_memory_bytes"] > stats["kv_bytes"]
    assert [layer["kept_tokens"] for layer in stats["policy_stats"]] == [
        stats["prompt_tokens"] + stats["generated_tokens"]] * 30


def test_prompt_from_stdin_without_chat_template():
    result = run_cli("--prompt", "-", "--ignore-chat-template", "--max-tokens", "3",
                     stdin="The capital of France is")
    assert result.returncode == 0, result.stderr
    # As in mlx-lm, the streamed text drops the first token's leading space.
    assert result.stdout.startswith("Paris")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    whole = write_gguf(root / "tiny.gguf", tiny_model("qwen3"))
    data = whole.read_bytes()
    (root / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (root / "corrupt.gguf").write_bytes(b"GGUF" + os.urandom(4092))
    iq4 = bytearray(data)
    name = b"blk.0.attn_q.weight"
    at = iq4.index(name) + len(name)
    struct.pack_into("<I", iq4, at + 4 + 8 * struct.unpack_from("<I", iq4, at)[0], 23)
    (root / "iq4.gguf").write_bytes(bytes(iq4))
    write_gguf(root / "gpt2.gguf", tiny_model("qwen3"), architecture="gpt2")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with open(GPL) as f:
        (root / "long.txt").write_text(f.read() * 2)
    return root


@pytest.mark.parametrize("case, args, fragments", [
    ("missing path", ["--model", "/nonexistent/model.gguf"], ["no such file"]),
    ("unknown alias", ["--model", "lama3"], ["unknown model 'lama3'", "llama3"]),
    ("corrupt gguf", ["--model", "{bad}/corrupt.gguf"], ["corrupt GGUF"]),
    ("truncated gguf", ["--model", "{bad}/truncated.gguf"], ["truncated GGUF"]),
    ("unsupported quant", ["--model", "{bad}/iq4.gguf"], ["'blk.0.attn_q.weight' is IQ4_XS"]),
    ("unsupported arch", ["--model", "{bad}/gpt2.gguf"], ["unsupported architecture 'gpt2'"]),
    ("empty prompt", ["--prompt", "  "], ["prompt is empty"]),
    ("no prompt", [], ["no prompt"]),
    ("prompt too long", ["--prompt-file", "{bad}/long.txt"],
     ["the prompt is", "context is 8192 tokens"]),
    ("missing prompt file", ["--prompt-file", "{bad}/nope.txt"], ["cannot read prompt file"]),
    ("binary prompt file", ["--prompt-file", "{bad}/binary.txt"], ["cannot read prompt file"]),
    ("prompt file is a directory", ["--prompt-file", "{bad}"], ["cannot read prompt file"]),
    ("non-numeric max tokens", ["--max-tokens", "many"], ["--max-tokens", "not a number"]),
    ("zero max tokens", ["--max-tokens", "0"], ["--max-tokens", "must be >= 1"]),
    ("negative temp", ["--temp", "-1"], ["--temp"]),
    ("top-p above one", ["--top-p", "1.5"], ["--top-p", "must be <= 1.0"]),
    ("unknown policy", ["--policy", "lru"], ["--policy", "invalid choice"]),
    ("stats in missing dir", ["--stats-json", "/nonexistent/dir/s.json"], ["cannot write"]),
])
def test_bad_input_gets_one_line(bad_files, case, args, fragments):
    args = [a.replace("{bad}", str(bad_files)) for a in args]
    if "--prompt" not in args and "--prompt-file" not in args and case != "no prompt":
        args += ["--prompt", "hello"]
    assert_one_line_error(run_cli(*args, "--max-tokens", "2") if "--max-tokens" not in args
                          else run_cli(*args), *fragments)


def test_hub_unreachable_says_so(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path),
           "HF_HUB_OFFLINE": "0"}
    result = run_cli("--model", "mlx-community/Qwen3-4B-4bit", "--prompt", "hi", env=env)
    assert_one_line_error(result, "cannot reach the Hugging Face hub", "--model PATH")


@pytest.fixture(scope="module")
def manual_prompt(tmp_path_factory):
    """About 1,000 tokens of the GNU coreutils manual."""
    import gzip

    with gzip.open("/usr/share/info/coreutils.info.gz", "rt") as f:
        text = f.read()[30000:34000]
    path = tmp_path_factory.mktemp("prompt") / "coreutils.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("args, kept", [
    (["--policy", "streaming", "--budget", "128"], lambda s: s == 128),
    (["--max-kv-size", "96"], lambda s: s == 96),
    (["--policy", "streaming", "--budget", "128", "--positions", "cache"], lambda s: s == 128),
    (["--policy", "snapkv", "--budget", "128", "--window", "16"], lambda s: s == 128 + 6),
    (["--policy", "h2o", "--budget-ratio", "0.1", "--min-budget", "0"], lambda s: 50 < s < 200),
    (["--policy", "h2o"], lambda s: s == 256),  # the default floor over 1/8 of ~1K tokens
    (["--policy", "refreshkv", "--budget", "64", "--refresh", "stride",
      "--refresh-every", "2", "--refresh-mode", "score"], lambda s: s > 1000),
])
def test_every_policy_generates_from_the_cli(tmp_path, manual_prompt, cli_in_process, args,
                                            kept):
    stats_path = tmp_path / "stats.json"
    result = cli_in_process("--prompt-file", str(manual_prompt), "--max-tokens", "6",
                     "--stats-json", str(stats_path), "--verbose", *args)
    assert result.returncode == 0, result.stderr
    stats = json.loads(stats_path.read_text())
    layers = stats["policy_stats"]
    assert len(layers) == 30 and all(kept(layer["kept_tokens"]) for layer in layers)
    assert "layer 29: kept_tokens" in result.stderr
    if stats["policy"] == "refreshkv":
        assert all(layer["retained_tokens"] == 64 for layer in layers)
        # 7 single-token steps (the last prompt token, then the 6 generated,
        # each fed back): the first selects, then every 2nd refreshes.
        assert all(layer["full_steps"] == 4 and layer["partial_steps"] == 3 for layer in layers)


def test_the_headline_command_on_a_short_prompt_writes_what_full_writes(cli_in_process):
    # The design card's command with its defaults: a 38-token prompt sits
    # under the floor, so RefreshKV attends to everything, as full does.
    prompt = ["--prompt", "Write a short poem about the sea.", "--max-tokens", "40"]
    full = cli_in_process("--policy", "full", *prompt)
    refreshkv = cli_in_process("--policy", "refreshkv", *prompt)
    assert full.returncode == 0 and refreshkv.returncode == 0, refreshkv.stderr
    assert refreshkv.stdout == full.stdout and len(full.stdout.split()) > 15


@pytest.mark.parametrize("args, fragment", [
    (["--policy", "snapkv", "--min-budget", "16"],
     "snapkv: --min-budget (16) must exceed --window (32)"),
    (["--policy", "streaming", "--budget", "8", "--min-budget", "4"], "--min-budget is the floor"),
    (["--policy", "mixed", "--budget", "0"], "mixed: --budget must be >= 1"),
    (["--max-kv-size", "64", "--min-budget", "32"], "--max-kv-size is a fixed budget"),
    (["--policy", "full", "--budget", "8"], "--budget does not apply to --policy full"),
    (["--policy", "h2o", "--max-kv-size", "8"], "--max-kv-size means --policy streaming"),
    (["--policy", "full", "--budget-ratio", "0.5"], "--budget-ratio does not apply"),
    (["--policy", "refreshkv", "--threshold", "3"], "--threshold"),
    (["--policy", "refreshkv", "--refresh", "sometimes"], "invalid choice"),
    (["--policy", "mixed", "--budget", "8", "--importance", "luck"], "invalid choice"),
    (["--policy", "mixed", "--budget", "8", "--refresh-every", "0"], "--refresh-every"),
])
def test_invalid_policy_settings_get_one_line(args, fragment):
    assert_one_line_error(run_cli("--prompt", "hi", *args), fragment)


@pytest.mark.parametrize("args, check", [
    (["--kv-bits", "4"], lambda s: s["policy"] == "quantized"),
    (["--max-kv-size", "64", "--kv-bits", "4"],
     lambda s: s["policy"] == "streaming" and s["policy_stats"][0]["kept_tokens"] == 64),
    (["--policy", "kivi", "--kv-bits", "2", "--residual", "32"],
     lambda s: s["policy_stats"][0]["quantized_tokens"] > 0),
    (["--policy", "mixed", "--budget", "32", "--high-bits", "8"],
     lambda s: s["policy_stats"][0]["demoted_tokens"] > 0),
    (["--policy", "mixed", "--budget", "32", "--importance", "refreshkv"],
     lambda s: s["policy_stats"][0]["high_precision_tokens"] == 32),
    (["--policy", "refreshkv", "--budget", "32", "--full-cache-bits", "4"],
     lambda s: s["policy_stats"][0]["retained_tokens"] == 32),
])
def test_quantized_policies_from_the_cli(tmp_path, manual_prompt, cli_in_process, args, check):
    # A third of the manual's stretch (~330 tokens) is past every budget here.
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(manual_prompt.read_text()[:1400])
    stats_path = tmp_path / "stats.json"
    result = cli_in_process("--prompt-file", str(prompt), "--max-tokens", "4",
                     "--stats-json", str(stats_path), *args)
    assert result.returncode == 0, result.stderr
    stats = json.loads(stats_path.read_text())
    assert check(stats), stats["policy_stats"][0]

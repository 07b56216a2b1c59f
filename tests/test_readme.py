"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def api_blocks():
    """The Python blocks of the README's Python API section and after."""
    api = README.read_text().split("\n## Python API\n", 1)[1]
    return [b for b in re.findall(r"```python\n(.*?)```", api, re.S)
            if "from mlx_kvcache import" in b]


def test_python_api_example_runs(capsys):
    example = api_blocks()[0]
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "tok/s, KV cache" in out


def test_chat_example_runs(tmp_path, monkeypatch, capsys):
    first, chat = api_blocks()[:2]
    assert "ChatSession" in chat
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.txt").write_text("Section 1 measures rivers.\n\n"
                                         "Section 2 concludes that the Rhine is long.\n")
    namespace = {}
    exec(compile(first, "README.md", "exec"), namespace)
    exec(compile(chat, "README.md", "exec"), namespace)
    assert (tmp_path / "report.chat").exists()
    assert namespace["chat"].stats()["turns"] == 2  # the document, the question

"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_python_api_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "from mlx_kvcache import" in b)
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "tok/s, KV cache" in out


def test_chat_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    first, chat = [b for b in blocks if "from mlx_kvcache import" in b][:2]
    assert "ChatSession" in chat
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.txt").write_text("Section 1 measures rivers.\n\n"
                                         "Section 2 concludes that the Rhine is long.\n")
    namespace = {}
    exec(compile(first, "README.md", "exec"), namespace)
    exec(compile(chat, "README.md", "exec"), namespace)
    assert (tmp_path / "report.chat").exists()
    assert namespace["chat"].stats()["turns"] == 2  # the document, the question

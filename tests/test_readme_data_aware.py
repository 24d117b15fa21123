"""The README's data-aware example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_data_aware_example_runs(capsys):
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- README-data-aware.*?-->\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    details = namespace["pruned"].report.results["prune_channels"].details
    assert any(row.get("method") == "lstsq" for row in details)
    assert {row["whitening"] for row in namespace["factored"].report.results["low_rank"].details} == {"svd-llm"}
    assert any(row.get("rounding") == "gptq" for row in namespace["quantized"].report.results["int8"].details)
    assert "lstsq" in capsys.readouterr().out

"""Every example in README.md runs as written: the python blocks in order in one namespace (with tiny
stand-ins for the data the README leaves to the reader), and the command lines."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.DOTALL)

# Lines of the bash blocks that are not fxcompress examples, or that another line covers.
NOT_RUN = {
    'pip install "torch==2.13.0" -e ".[dev]"': "the install itself (CI does it)",
    "python -m pytest -q -n auto": "this suite",
    "fxcompress demo": "all three example models (~100 s); `python -m fxcompress demo --model resnet` runs the same code",
}

pytestmark = pytest.mark.slow
CHAIN_SPLIT = 3  # the chain's first three blocks: quickstart, backend, pass examples


def blocks(language: str) -> list[str]:
    """The README's code blocks in ``language``, except those marked ``<!-- README-... -->``, which
    have a test of their own (e.g. tests/test_readme_data_aware.py)."""
    text = README.read_text()
    return [m.group(2) for m in BLOCK.finditer(text)
            if m.group(1) == language and not text[:m.start()].rstrip().endswith("-->")]


def namespaces(codes: list[str], base: dict) -> list[tuple[str, dict]]:
    """Blocks continue the quickstart's namespace (its ``model``/``x``), except a later block that starts
    with ``import torch``: a standalone example, run in a fresh namespace."""
    return [(code, {} if i > 0 and code.lstrip().startswith("import torch") else base) for i, code in enumerate(codes)]


def command_lines() -> list[str]:
    lines = [line.split("#")[0].strip() for code in blocks("bash") for line in code.splitlines()]
    return [line for line in lines if line and line not in NOT_RUN and not line.startswith("python bench/")]


def stand_ins() -> dict:
    """What the README assumes the reader has: calibration batches and a labelled training loader."""
    images = torch.randn(2, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.randint(0, 10, (2,))), batch_size=2)
    return {"batches": [torch.randn(2, 3, 32, 32) for _ in range(2)], "train_loader": loader}


def test_the_readme_has_examples():
    assert len(blocks("python")) >= 4 and len(command_lines()) >= 3


def chain_and_standalone() -> tuple[list[str], list[str]]:
    """The quickstart's chain of blocks (one namespace), and the standalone blocks (each its own)."""
    base: dict = {}
    pairs = namespaces(blocks("python"), base)
    return [code for code, scope in pairs if scope is base], [code for code, scope in pairs if scope is not base]


def run_blocks(codes: list[str], namespace: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example that warns is an example that surprises
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for code in codes:
            exec(compile(code, str(README), "exec"), namespace)  # noqa: S102


def imports_of(code: str) -> str:
    """Only the import statements of a block."""
    tree = ast.parse(code)
    tree.body = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    return ast.unparse(tree)


def test_python_examples_run_as_written(tmp_path, monkeypatch):
    """The quickstart's chain up to the pass examples, as written."""
    monkeypatch.chdir(tmp_path)
    namespace = stand_ins()
    run_blocks(chain_and_standalone()[0][:CHAIN_SPLIT], namespace)
    assert (tmp_path / "model.pt2").exists()
    assert namespace["restored"].report.rows == namespace["compressed"].report.rows


def test_later_python_examples_run_as_written(tmp_path, monkeypatch):
    """The rest of the chain, after the quickstart block and the imports of the blocks the test above
    runs (two tests, so the suite's workers run the two halves side by side)."""
    monkeypatch.chdir(tmp_path)
    namespace = stand_ins()
    chain = chain_and_standalone()[0]
    run_blocks([chain[0], *map(imports_of, chain[1:CHAIN_SPLIT]), *chain[CHAIN_SPLIT:]], namespace)
    assert namespace["student"].report.rows[-1]["stage"] == "recover"


@pytest.mark.parametrize("index", range(len(chain_and_standalone()[1])))
def test_standalone_python_examples_run_as_written(index, tmp_path, monkeypatch):
    """Each block that starts with ``import torch`` runs alone, in a fresh namespace (its own test, so
    the suite's workers can run them side by side)."""
    monkeypatch.chdir(tmp_path)
    run_blocks([chain_and_standalone()[1][index]], {})


@pytest.mark.parametrize("line", command_lines())
def test_command_lines_run_as_written(line, tmp_path):
    argv = shlex.split(line)
    if argv[0] == "fxcompress":
        argv = [sys.executable, "-m", "fxcompress", *argv[1:]]
    elif argv[0] == "python":
        argv[0] = sys.executable
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| stage" in proc.stdout
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-2000:]

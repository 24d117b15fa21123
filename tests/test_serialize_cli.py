import json
import subprocess
import zipfile

import torch

import fxcompress
from fxcompress.models import EXAMPLES
from fxcompress.verify import fidelity


def test_save_load_round_trip_keeps_outputs_and_dynamic_batch(tmp_path):
    for name in ("resnet", "transformer"):
        factory, inputs = EXAMPLES[name]
        model, x = factory(), inputs()
        out = fxcompress.optimize(model, x, report=False)
        path = tmp_path / f"{name}.pt2"
        fxcompress.save(out, path)
        loaded = fxcompress.load(path)
        with torch.no_grad():
            assert fidelity(out(*x), loaded(*x)).max_abs_err == 0.0
            bigger = tuple(torch.cat([t, t]) for t in x)
            assert fidelity(model(*bigger), loaded(*bigger)).max_rel_err <= 1e-5
        assert loaded.pipeline == out.pipeline
        assert [r["stage"] for r in loaded.report.rows] == ["input", "eliminate_identity", "fold_bn"]
        with zipfile.ZipFile(path) as archive:
            assert not any(n.endswith(".pkl") for n in archive.namelist())


def run_cli(*args, capsys):
    """The CLI in-process (``fxcompress.cli.main``); tests/test_readme.py runs the README's command lines
    as subprocesses, so the ``python -m fxcompress`` entry point is covered there."""
    from fxcompress.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_cli_optimize_end_to_end(tmp_path, capsys):
    out, report = tmp_path / "model.pt2", tmp_path / "report.json"
    proc = run_cli(
        "optimize", "fxcompress.models:resnet_small", "--input-shape", "2,3,32,32",
        "--passes", "fold_bn", "--out", str(out), "--json", str(report), capsys=capsys,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fold_bn" in proc.stdout and "latency ms" in proc.stdout
    assert json.loads(report.read_text())["rows"][1]["stage"] == "fold_bn"
    loaded = fxcompress.load(out)
    assert loaded(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_cli_token_inputs_and_errors(capsys):
    proc = run_cli("optimize", "fxcompress.models:transformer_small", "--input-shape", "2,16", "--input-dtype", "long", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("optimize", "fxcompress.models:resnet_small", "--input-shape", "2,3,32,32", "--passes", "nope", capsys=capsys)
    assert proc.returncode == 2 and "unknown pass 'nope'" in proc.stderr
    proc = run_cli("optimize", "fxcompress.models", "--input-shape", "2,3,32,32", capsys=capsys)
    assert proc.returncode == 2 and "PKG.MODULE:FACTORY" in proc.stderr
    proc = run_cli("optimize", "fxcompress.models:resnet_small", "--input-shape", "2,3,32,32", "--option", "fold_bn.x=1", capsys=capsys)
    assert proc.returncode == 2 and "no option" in proc.stderr and "valid options" in proc.stderr


def test_cli_lists_passes(capsys):
    proc = run_cli("passes", capsys=capsys)
    assert proc.returncode == 0 and "fold_bn" in proc.stdout and "lossless" in proc.stdout
    assert "ratio: float | None = None" in proc.stdout  # options with their types, as Python's errors list them


def test_cli_demo_runs_the_shipped_example(tmp_path, capsys):
    report = tmp_path / "demo.json"
    proc = run_cli("demo", "--model", "mobilenet", "--json", str(report), capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "## mobilenet" in proc.stdout and "fold_bn" in proc.stdout
    rows = json.loads(report.read_text())["mobilenet"]["rows"]
    assert [r["stage"] for r in rows] == ["input", "eliminate_identity", "fold_bn"]
    assert rows[-1]["max_abs_err"] < 1e-4

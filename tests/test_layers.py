"""The layers of ARCHITECTURE.md (kernels ← ops ← passes ← API, core under all of them) hold in the code.

Every import of every module — at the top or inside a function — is read with ``ast`` and must point
down; ``import fxcompress`` must not load the passes, the ops or the kernels (they load on first use).
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = {"fxcompress": "fxcompress", "passes": "fxcompress.passes", "triton_kernels": "fxcompress.triton_kernels"}
API = {f"fxcompress{suffix}" for suffix in (
    "", ".__main__", ".api", ".apply", ".calibrate", ".cli", ".distill", ".distill_config", ".dynamo_backend",
    ".expert_layers", ".generation", ".hf_quantizer", ".layers", ".manager", ".models", ".registry", ".serialize")}
MAY_IMPORT = {
    "kernels": {"kernels"},
    "core": {"core"},
    "ops": {"ops", "kernels", "core"},
    "passes": {"passes", "ops", "core"},
    "api": {"api", "passes", "ops", "kernels", "core"},
}


def layer(module: str) -> str:
    for prefix, name in (("fxcompress.triton_kernels", "kernels"), ("fxcompress.ops", "ops"),
                         ("fxcompress.passes", "passes"), ("fxcompress.search", "api")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "api" if module in API else "core"


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in SOURCE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The fxcompress modules ``module`` imports anywhere in its code (``from pkg import sub`` names ``pkg.sub``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return names & known


def test_every_import_points_down_the_layers():
    found = modules()
    assert {"fxcompress.ops.int8_linear", "fxcompress.passes.int8", "fxcompress.triton_kernels.int8_gemm"} <= set(found)
    upward = []
    for module, path in sorted(found.items()):
        for target in sorted(imported(module, path, set(found))):
            if layer(target) not in MAY_IMPORT[layer(module)]:
                upward.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    assert not upward, "\n".join(upward)


def test_an_import_inside_a_function_is_read_too(tmp_path):
    source = tmp_path / "ir.py"
    source.write_text("def lookup():\n    from .passes import int8\n    import fxcompress.ops\n")
    found = imported("fxcompress.ir", source, set(modules()))
    assert found == {"fxcompress.passes.int8", "fxcompress.ops"}
    assert {layer(m) for m in found} - MAY_IMPORT[layer("fxcompress.ir")] == {"passes", "ops"}


def test_import_fxcompress_loads_neither_passes_nor_ops_nor_kernels():
    loaded = ("sorted({'.'.join(m.split('.')[:2]) for m in sys.modules "
              "if m.startswith(('fxcompress.passes', 'fxcompress.ops', 'fxcompress.triton_kernels'))})")
    code = f"import sys, fxcompress; print({loaded}); import fxcompress.ops; print({loaded})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    after_fxcompress, after_ops = proc.stdout.splitlines()
    assert after_fxcompress == "[]"
    assert after_ops == "['fxcompress.ops', 'fxcompress.triton_kernels']"  # the ops load no pass

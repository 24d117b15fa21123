"""Decoder families × passes: every registered pass on a tiny model of each decoder family, used as users use it.

    python bench/llm_families.py        # about 2 minutes on 2 cores; accuracy-only (no timings)

Families (``tests/llm_zoo.py``, random weights from configs): Llama (GQA, RoPE, SwiGLU), MQA with an explicit
``head_dim``, Qwen2 (q/k/v biases, tied head), Mistral (sliding window), Phi-3 (fused ``qkv_proj`` /
``gate_up_proj``), GPT-2 (learned positions, ``Conv1D``), Mixtral and Qwen2-MoE (routed experts). Per family × pass,
on the graph captured once with the family's default config (``use_cache=True``): what the pass rewrote, logits shape
at the example and at another batch and length, the graph applied back onto the model (``apply_to_model``),
greedy generation with its KV cache against the original (``generation_fidelity``: greedy-token match, 16 new
tokens, 3 prompts; exact for lossless passes), ``save_pretrained`` → ``load_pretrained`` → the same logits (or the warning ``apply_to_model`` gives where the
HF config cannot describe the result), and bytes. Pruning runs with ``scope="local"`` (every layer alike: what
save/load needs).
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxcompress  # noqa: E402
from fxcompress.capture import capture  # noqa: E402
from fxcompress.manager import PassManager  # noqa: E402
from fxcompress.pass_base import PassContext  # noqa: E402
from fxcompress.registry import make_pass, registered_passes  # noqa: E402
from tests import llm_zoo  # noqa: E402

import common  # noqa: E402

FAMILIES = {**llm_zoo.FAMILIES, "mixtral": llm_zoo.mixtral, "qwen2_moe": llm_zoo.qwen2_moe}
PASS_OPTIONS = {"prune_channels": dict(ratio=0.5, scope="local"), "low_rank": dict(rank=0.25), "int8": dict(min_weight_numel=0, embeddings=True)}


def weight_bytes(module: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def logits(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return module(**inputs).logits


def one(model, inputs, graph, pass_name: str) -> dict:
    the_pass = make_pass(pass_name, **PASS_OPTIONS.get(pass_name, {}))
    gm = copy.deepcopy(graph)
    result = PassManager([the_pass]).run(gm, PassContext((), inputs))[0].result
    others = [llm_zoo.tokens(batch=3, length=8, seed=1), llm_zoo.tokens(batch=1, length=5, seed=2)]
    shapes_ok = all(logits(gm, x).shape == logits(model, x).shape for x in [inputs, *others])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fxcompress.FxCompressWarning)
        applied = fxcompress.apply_to_model(gm, model)
    refused = next((str(w.message) for w in caught if "cannot rebuild" in str(w.message)), None)
    prompts = llm_zoo.tokens(batch=3, length=6, seed=3)["input_ids"]
    fidelity = fxcompress.generation_fidelity(model, applied, prompts, new_tokens=16)
    reload_ok = f"warned: {refused.split(';')[0].removeprefix('fxcompress: ')}" if refused else None
    with tempfile.TemporaryDirectory() as directory:
        if refused is None:
            applied.save_pretrained(directory)
            reloaded = fxcompress.load_pretrained(type(model), directory)
            reload_ok = torch.allclose(logits(reloaded, others[0]), logits(applied, others[0]), rtol=1e-5, atol=1e-5)
    return {"rewritten": len(result.rewritten), "lossless": the_pass.lossless, "logits shape (3 shapes)": shapes_ok,
            "greedy_match": fidelity.greedy_match, "top1_agreement": fidelity.top1_agreement,
            "save/load same logits": reload_ok, "bytes_vs_original": weight_bytes(applied) / weight_bytes(model)}


def main() -> None:
    parser = __import__("argparse").ArgumentParser(description=__doc__)
    common.add_tag_argument(parser)
    args = parser.parse_args()
    rows, started = [], time.perf_counter()
    for family, build in FAMILIES.items():
        torch.manual_seed(0)
        model, inputs = build().eval(), llm_zoo.tokens()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = capture(model, inputs)
        for pass_name in sorted(registered_passes()):
            try:
                row = one(model, inputs, graph, pass_name)
            except Exception as error:  # a failure is a row of the table, with its cause
                row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
                traceback.print_exc()
            rows.append({"family": family, "pass": pass_name, **row})
            print(rows[-1], flush=True)
    table = tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3g")
    failed = [f"{r['family']}/{r['pass']}" for r in rows if "error" in r or not r.get("logits shape (3 shapes)")
              or r.get("save/load same logits") is False or (r.get("lossless") and r.get("greedy_match") != 1.0)]
    warned = [f"{r['family']}/{r['pass']}" for r in rows if str(r.get("save/load same logits")).startswith("warned")]
    summary = (f"{len(rows)} family x pass runs, {len(rows) - len(failed) - len(warned)} pass every check"
               + (f"; failing: {', '.join(failed)}" if failed else "")
               + (f"; save/load refused up front with a warning (the HF config cannot describe the result): {', '.join(warned)}" if warned else "") + f"; {time.perf_counter() - started:.0f} s; "
               "command: `python bench/llm_families.py`; options: " + str(PASS_OPTIONS))
    print(common.write_results("llm_families", {"rows": rows, "summary": summary}, f"{table}\n\n{summary}", args.tag))
    print(table, "\n", summary)


if __name__ == "__main__":
    main()

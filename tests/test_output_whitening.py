"""Two-sided (output-whitened) refit of low_rank: ``whiten_output=True``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fxcompress.capture import capture
from fxcompress.errors import PassConfigError
from fxcompress.manager import apply_pass
from fxcompress.pass_base import PassContext
from fxcompress.passes import _output_whitening, _refit, _whitening
from fxcompress.passes.low_rank import LowRank


def random_gram(n: int, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    return x.T @ x


def reconstructed(fit: _refit.Fit, rank: int) -> torch.Tensor:
    first, second = _whitening.basis_factors(fit.target, fit.basis, rank)
    return second @ first


def test_two_sided_error_is_discarded_spectrum_and_beats_input_only():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 24, generator=gen, dtype=torch.float64)
    gram_in, gram_out = random_gram(24, 200, 1), random_gram(16, 100, 2)
    mean = torch.zeros(24, dtype=torch.float64)
    root, inverse_root = _output_whitening.output_root(gram_out, damping=1e-3)
    two_sided = _refit.fit(w, mean, mean, gram_in, ridge=0.0, output=(root, inverse_root))
    input_only = _refit.fit(w, mean, mean, gram_in, ridge=0.0)

    def weighted_error(approximation):  # tr(E G_in Eᵀ (G_out + δI)): the objective P·E·R
        error = approximation - w
        return float(torch.trace(error @ gram_in @ error.T @ root @ root))

    for rank in (3, 8):
        error = weighted_error(reconstructed(two_sided, rank))
        assert error == pytest.approx(float(two_sided.spectrum[rank:].square().sum()), rel=1e-8)
        assert error < 0.9 * weighted_error(reconstructed(input_only, rank))
    assert torch.allclose(reconstructed(two_sided, 16), w, atol=1e-10)  # full rank: exact


def test_identity_output_gram_equals_input_only_whitening():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(10, 14, generator=gen, dtype=torch.float64)
    gram_in, mean = random_gram(14, 80, 4), torch.zeros(14, dtype=torch.float64)
    identity = _output_whitening.output_root(torch.eye(10, dtype=torch.float64))
    two_sided = _refit.fit(w, mean, mean, gram_in, output=identity)
    input_only = _refit.fit(w, mean, mean, gram_in)
    assert torch.allclose(two_sided.spectrum / two_sided.spectrum[0], input_only.spectrum / input_only.spectrum[0])
    for rank in (2, 5):
        assert torch.allclose(reconstructed(two_sided, rank), reconstructed(input_only, rank), atol=1e-10)


class Attention(nn.Module):
    """One softmax attention head over a sequence, then a readout: a query/key error goes through the softmax."""

    def __init__(self, d: int = 24, head: int = 16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, head), nn.Linear(d, head), nn.Linear(d, head)
        self.out = nn.Linear(head, 8)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2)
        return self.out(torch.softmax(scores, dim=-1) @ self.v(x))


def attention_model_and_data():
    torch.manual_seed(0)
    model = Attention().eval()
    with torch.no_grad():  # a few dominant score directions, as trained attention has
        model.q.weight.mul_(torch.logspace(0.5, -1, 16).unsqueeze(1))
        model.k.weight.mul_(torch.logspace(-1, 0.5, 16).unsqueeze(1))
    gen = torch.Generator().manual_seed(1)
    mixing = torch.randn(24, 24, generator=gen) * torch.logspace(0, -1, 24)
    data = [torch.randn(4, 10, 24, generator=gen) @ mixing.T for _ in range(6)]
    return model, data


def output_error(model, gm, data) -> float:
    with torch.no_grad():
        return sum(float((gm(x) - model(x)).square().sum()) for x in data) / sum(float(model(x).square().sum()) for x in data)


@pytest.mark.parametrize("refit", ["independent", "sequential"])
def test_attention_output_error_lower_with_output_whitening(refit):
    model, data = attention_model_and_data()
    calibration, held_out = data[:4], data[4:]
    gm = capture(model, (calibration[0],))
    errors = {}
    for output in (False, True):
        compressed = copy.deepcopy(gm)
        compression = LowRank(layer_ranks=(("q", 4), ("k", 4)), whiten="svd-llm", refit=refit, whiten_output=output)
        result = apply_pass(compression, compressed, PassContext((calibration[0],), {}, calibration=calibration))
        assert sorted(result.rewritten) == ["k", "q"]
        assert all(("output-whitened" in row["whitening"]) == output for row in result.details)
        errors[output] = output_error(model, compressed, held_out)
    assert errors[True] < 0.8 * errors[False]


def test_output_gram_matches_exact_jacobian():
    model, data = attention_model_and_data()
    x = data[0][:1]
    gm = capture(model, (x,))
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and "q" in str(n.meta.get("nn_module_stack", "")))
    estimated = _output_whitening.output_grams(gm, [x] * 400, [node], projections=1)[node.name] / 400
    q = model.q(x).detach()

    def outputs(query):
        scores = query @ model.k(x).transpose(-1, -2)
        return model.out(torch.softmax(scores, -1) @ model.v(x)).flatten()

    jacobian = torch.autograd.functional.jacobian(outputs, q).reshape(-1, 10, 16)  # outputs × rows × N
    exact = torch.einsum("ota,otb->ab", jacobian, jacobian).double()
    assert torch.linalg.matrix_norm(estimated - exact) < 0.2 * torch.linalg.matrix_norm(exact)


def test_whiten_output_needs_refit():
    with pytest.raises(PassConfigError, match="whiten_output=True needs a refit"):
        LowRank(target_macs=0.5, whiten="svd-llm", whiten_output=True)


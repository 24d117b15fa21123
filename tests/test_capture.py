import copy

import pytest
import torch

import fxcompress
from fxcompress.verify import fidelity, output_signature
from zoo import ZOO, hf_models


def _close(a, b, rtol=1e-5):
    return output_signature(a) == output_signature(b) and fidelity(a, b).max_rel_err <= rtol


@pytest.mark.parametrize("name", list(ZOO))
def test_capture_round_trip(name):
    make_model, make_inputs = ZOO[name]
    model, inputs = make_model(), make_inputs()
    gm = fxcompress.capture(model, inputs)
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.no_grad():
        assert _close(model(*inputs), gm(*inputs))
        other_batch = tuple(torch.cat([x, x]) for x in inputs)  # the batch dim stays dynamic
        assert _close(model(*other_batch), gm(*other_batch))


def test_capture_hugging_face_models_keep_output_structure():
    for name, (model, kwargs) in hf_models().items():
        gm = fxcompress.capture(model, kwargs)
        with torch.no_grad():
            expected, got = model(**kwargs), gm(**kwargs)
        assert type(got) is type(expected), name
        assert list(got.keys()) == list(expected.keys()), name
        assert fidelity(expected, got).max_rel_err <= 1e-5, name
        ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert ops & {"aten.linear.default", "aten.addmm.default"}, name  # GPT-2 uses Conv1D = addmm


def test_capture_does_not_share_or_mutate_user_weights():
    model, inputs = ZOO["plain_cnn"][0](), ZOO["plain_cnn"][1]()
    before = copy.deepcopy(model.state_dict())
    gm = fxcompress.capture(model, inputs)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:
            return x
        return -x


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.branchy = DataDependent()

    def forward(self, x):
        return self.branchy(self.linear(x))


def test_untraceable_model_error_names_module_and_fix():
    with pytest.raises(fxcompress.CaptureError) as info:
        fxcompress.capture(Outer(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "branchy (DataDependent)" in message
    assert "What you can do" in message


def test_wrong_example_inputs_error():
    with pytest.raises(fxcompress.InvalidInputError, match="does not run on the given example inputs"):
        fxcompress.capture(torch.nn.Linear(4, 4), (torch.randn(2, 5),))
    with pytest.raises(fxcompress.InvalidInputError, match="example_inputs must be"):
        fxcompress.capture(torch.nn.Linear(4, 4), "not inputs")
    with pytest.raises(fxcompress.InvalidInputError, match="no tensor"):
        fxcompress.capture(torch.nn.Linear(4, 4), ())


def test_unsupported_dtype_error_names_fix():
    with pytest.raises(fxcompress.InvalidInputError, match=r"float64.*model.float\(\)"):
        fxcompress.capture(torch.nn.Linear(4, 4).double(), (torch.randn(2, 4, dtype=torch.float64),))


def test_not_a_module_error():
    with pytest.raises(fxcompress.InvalidInputError, match="must be a torch.nn.Module"):
        fxcompress.capture(lambda x: x, (torch.randn(2),))

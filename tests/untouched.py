"""Snapshot of everything of a user's model fxcompress promises not to change."""

from __future__ import annotations

import torch


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "versions": {k: v._version for k, v in model.state_dict(keep_vars=True).items()},
        "identity": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {name: p.grad is None for name, p in model.named_parameters()},
        "hooks": {
            name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._backward_pre_hooks), len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks))
            for name, m in model.named_modules()
        },
        "modules": {name: id(m) for name, m in model.named_modules()},
        "forward": model.__dict__.get("forward"),
    }


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("versions", "identity", "training", "requires_grad", "grads", "hooks", "modules", "forward"):
        assert after[key] == before[key], f"the user's model changed: {key}"
    assert after["state"].keys() == before["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), f"the user's model changed: {name}"

"""Shared test set-up and helpers."""

import os

import pytest
import torch
from hypothesis import settings

import cascadenet as cn

# Tiny test tensors run fastest on one thread, and one thread does not stall when other work shares the 2 cores.
torch.set_num_threads(1)

# CI explores the same examples on every run (a failure there must be reproducible, not a draw of luck);
# locally hypothesis keeps drawing new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(name="resnet18", **options):
    """A cascaded ResNet small enough for unit tests (width 4, 5 classes unless given)."""
    options.setdefault("width", 4)
    options.setdefault("num_classes", 5)
    return cn.create_model(name, **options)


@torch.no_grad()
def perturb_norms(model, seed=1):
    """Random batch-norm statistics and affine parameters, different per slot, so that every slot matters (and
    evaluation-mode tests can tell slots apart)."""
    g = torch.Generator().manual_seed(seed)
    for bn in model.norms():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)

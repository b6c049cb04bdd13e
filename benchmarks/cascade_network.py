"""Benchmark: a user's network cascaded with ``cascadenet.cascade`` against the project's own cascaded ResNet.

    python benchmarks/cascade_network.py            # ResNet-18 width 16, 32x32, batch 64, 1 thread

The same architecture both ways: the project's ``resnet18`` (CIFAR stem) and a torchvision-layout ResNet-18 with
the same stem and widths, cascaded by ``cascadenet.cascade`` (its residual branches are the user's modules, run
once per distinct state: ``models/network.py``). Both go through the same trajectory engine (the same distinct
states, the same MACs); the difference is that the project's branches stack the distinct states of a branch into
one convolution call. Inference (engine, no grad) and a training step (engine, TD loss, backward) are timed
interleaved in one process (A, B, A, B, ...), medians after warm-up; the ratio is what we report. ``anytime``:
``model.anytime(x)`` run through every step (the step-by-step engine that ``cascadenet.predict`` early-exits with).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import cascadenet as cn


class _Basic(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class _ResNet18(nn.Module):
    """torchvision's ResNet-18 layout with the CIFAR stem (3x3 conv, no max-pool)."""

    def __init__(self, width: int, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        cin = width
        for s in range(4):
            blocks = []
            for i in range(2):
                blocks.append(_Basic(cin, width * 2**s, 2 if s and not i else 1))
                cin = width * 2**s
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, classes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    own = cn.create_model("resnet18", num_classes=10, width=args.width, stem="cifar")
    user = cn.cascade(_ResNet18(args.width))
    assert own.exit_costs((3, 32, 32)).macs == user.exit_costs((3, 32, 32)).macs  # the same work
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def infer(m: nn.Module) -> None:
        m.eval()
        with torch.no_grad():
            m(x)

    def anytime(m: nn.Module) -> None:  # real early exit's engine, every step taken (cascadenet.predict)
        m.eval()
        with torch.no_grad():
            for _ in m.anytime(x):
                pass

    def train(m: nn.Module) -> None:
        m.train()
        cn.td_loss(m(x), y, 0.5, first_step=m.first_informative_exit).backward()

    out = {}
    for name, fn in (("inference", infer), ("anytime", anytime), ("train_step", train)):
        times: dict[str, list[float]] = {"own": [], "cascade": []}
        for _ in range(2):
            fn(own), fn(user)
        for _ in range(args.reps):
            for key, m in (("own", own), ("cascade", user)):
                t = time.perf_counter()
                fn(m)
                times[key].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {
            "own_ms": 1e3 * med["own"],
            "cascade_ms": 1e3 * med["cascade"],
            "ratio": med["cascade"] / med["own"],
        }
    print(json.dumps({"config": vars(args), **out}, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: training throughput of CascadedTD against a plain feed-forward ResNet training step.

    python benchmarks/throughput.py                        # ResNet-18, width 16, 32x32, batch 64, CPU (2 threads)
    python benchmarks/throughput.py --device cuda --width 64 --batch 256          # the real ResNet-18 on a GPU
    python benchmarks/throughput.py --device cuda --stem imagenet --size 224 --batch 128   # ImageNet-sized
    python benchmarks/throughput.py --compile              # torch.compile both steps (off by default)

Both variants are one optimizer step (SGD, Nesterov momentum) of the same network, with the same batch and
settings, in one process, timed interleaved (A, B, A, B, ...) so that drifting load hits both alike:

- CascadedTD: the trajectory engine over all T steps + the TD(0.5) loss + backward;
- feed-forward: ``model.feedforward`` (the ordinary ResNet with the same weights) + cross-entropy + backward.

The printed ratio (CascadedTD step time / feed-forward step time) stands next to the *ideal* ratio: the work
of the distinct states the engine must compute over that of one feed-forward pass (multiply-accumulates per
example; ResNet-18 with T = 10: 36 block evaluations against 8, about 4.5x). A ratio near the ideal one means the
engine spends nothing beyond the arithmetic it cannot avoid. On CUDA, bf16 autocast and channels_last are on
(as in training); times are taken with CUDA synchronisation. Medians over repetitions after warm-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import cascadenet as cn
from cascadenet.training.losses import td_loss
from cascadenet.utils.device import autocast
from engine import cpu_model  # benchmarks/engine.py, beside this script


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ideal_ratio(model: cn.CascadedResNet, size: int) -> tuple[float, float]:
    """(MAC ratio, block-evaluation ratio) of the engine's distinct states to one feed-forward pass."""
    shape = (3, size, size)
    macs = model.exit_costs(shape).macs[-1] / model.feedforward_macs(shape)
    # block evaluations: the input of block k takes k + 1 distinct input-dependent values before it settles
    # (one more per block of depth), fewer when the trajectory stops before the settling time
    T, D = model.num_steps, model.num_blocks
    blocks = sum(min(k + 1, max(T - 1 - int(model.stem_delay), 1)) for k in range(D)) / D
    return macs, blocks


def make_steps(args, device):
    torch.manual_seed(0)
    model = cn.create_model(args.model, num_classes=args.classes, width=args.width, stem=args.stem).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    models = {"cascaded_td": model, "feedforward": copy.deepcopy(model)}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), device=device)

    def td(m):
        return td_loss(m(x), y, 0.5, first_step=m.first_informative_exit)

    def ff(m):
        return F.cross_entropy(m.feedforward(x).float(), y)

    steps = {}
    for name, loss_of in (("cascaded_td", td), ("feedforward", ff)):
        m = models[name].train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        fn = torch.compile(loss_of) if args.compile else loss_of

        def step(m=m, opt=opt, fn=fn):
            with autocast(device.type, args.amp):
                loss = fn(m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    return steps, model


def time_interleaved(steps, reps, warmup, device):
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    sync(device)
    times = {k: [] for k in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--stem", default="cifar", choices=["cifar", "cifar_pool", "imagenet"])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (CUDA default)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="(CUDA default)")
    p.add_argument("--compile", action="store_true", help="torch.compile both training steps (off by default)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    args.channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last

    steps, model = make_steps(args, device)
    t = time_interleaved(steps, args.reps, args.warmup, device)
    mac_ratio, block_ratio = ideal_ratio(model, args.size)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {args.threads} threads"
    result = {
        "config": {
            k: getattr(args, k)
            for k in ("model", "width", "stem", "size", "batch", "amp", "channels_last", "compile", "reps", "warmup")
        },  # fmt: skip
        "device": where,
        "torch": torch.__version__,
        "steps": model.num_steps,
        "cascaded_td_step_s": t["cascaded_td"],
        "feedforward_step_s": t["feedforward"],
        "cascaded_td_images_per_s": args.batch / t["cascaded_td"],
        "feedforward_images_per_s": args.batch / t["feedforward"],
        "ratio": t["cascaded_td"] / t["feedforward"],
        "ideal_ratio_macs": mac_ratio,
        "ideal_ratio_blocks": block_ratio,
    }
    print(f"{args.model} width {args.width}, {args.stem} stem, {args.size}x{args.size}, batch {args.batch}, "
          f"T = {model.num_steps}, amp {args.amp}, channels_last {args.channels_last}, "
          f"compile {args.compile}")  # fmt: skip
    print(f"device: {where}; torch {torch.__version__}")
    for name, label in (("cascaded_td", "CascadedTD training step  "), ("feedforward", "feed-forward training step")):
        print(f"  {label} {t[name] * 1e3:9.1f} ms  {result[name + '_images_per_s']:9.0f} img/s")
    print(f"  ratio {result['ratio']:.2f}x   ideal (distinct states / one pass): {mac_ratio:.2f}x in MACs, "
          f"{block_ratio:.2f}x in block evaluations")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""Benchmark: is decoding the bottleneck? Images/second of the streaming loader alone against the training step.

    python benchmarks/loader.py                          # CPU: 2 threads for the model, workers 0, 1, 2
    python benchmarks/loader.py --device cuda --workers 0 4 8 16 --batch 128 --width 64

Generates an image folder of JPEGs of ImageNet's typical size (500x375, quality 90; noise plus smooth
gradients, so that they decode like photographs rather than flat colour) in a temporary folder, then measures

- the loader alone: ``cascadenet.data.streaming.stream_batches`` with the training transform (random resized crop to
  --size, flip), batches copied to the device and normalised, for each worker count;
- one training step of CascadedTD (trajectory engine + TD loss, ResNet-18 with the ImageNet stem at --size), the
  same as ``benchmarks/throughput.py``.

Decoding is not the bottleneck when the loader's images/s exceed the training step's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import throughput  # noqa: E402
from cascadenet.data import streaming  # noqa: E402


def make_folder(root: Path, n: int, classes: int = 4) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        base = (np.sin(xx / (20 + i % 7)) + np.cos(yy / (15 + i % 5))) * 60 + 128
        img = np.clip(base[..., None] + rng.normal(0, 25, (375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i}.jpg", quality=90)


def loader_rate(index, batch, workers, device, reps=2) -> float:
    mean, std = streaming.streaming_normalization()
    best = 0.0
    for rep in range(reps):
        g = torch.Generator().manual_seed(rep)
        t = time.perf_counter()
        n = 0
        for x, _ in streaming.stream_batches(index, batch, train=True, shuffle=True, mean=mean, std=std,
                                             device=device, generator=g, drop_last=True, workers=workers):  # fmt: skip
            n += len(x)
        throughput.sync(device)
        best = max(best, n / (time.perf_counter() - t))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        make_folder(Path(tmp), args.images)
        index = streaming.index_folder(tmp, "train", args.size)
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else throughput.cpu_model()
        print(f"{args.images} JPEGs of 500x375 -> {args.size}x{args.size}, batch {args.batch}; {where}; "
              f"torch {torch.__version__}")  # fmt: skip
        for w in args.workers:
            print(f"  loader alone, {w} worker(s): {loader_rate(index, args.batch, w, device):8.0f} img/s")
    ns = argparse.Namespace(model="resnet18", classes=1000, width=args.width, stem="imagenet", size=args.size,
                            batch=args.batch, compile=False, amp=device.type == "cuda",
                            channels_last=device.type == "cuda")  # fmt: skip
    steps, _ = throughput.make_steps(ns, device)
    t = throughput.time_interleaved(steps, args.reps, 1, device)
    for name in ("cascaded_td", "feedforward"):
        print(f"  training step ({name}, width {args.width}): {args.batch / t[name]:8.0f} img/s")


if __name__ == "__main__":
    main()

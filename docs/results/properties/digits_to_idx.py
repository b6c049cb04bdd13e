"""Writes scikit-learn's bundled handwritten digits as an MNIST-format test split (t10k-*-idx*-ubyte), so that
`cascadenet ood --ood-dataset mnist --ood-data DIR` can use them as the "handwritten digits" OOD set for a
Fashion-MNIST model on a machine without MNIST (no Debian package ships it; nothing here downloads anything).

The digits are the UCI optical-recognition set that scikit-learn ships inside its wheel (1797 images of 8x8 pixels,
16 grey levels, 43 writers), not MNIST. Each is scaled to 0..255, resized (antialiased bilinear) to 20x20 and centred
in a 28x28 frame, the layout of MNIST's digits. Needs scikit-learn, which cascadenet does not depend on:

    python -m venv /tmp/sk && /tmp/sk/bin/pip install scikit-learn torch
    /tmp/sk/bin/python docs/results/properties/digits_to_idx.py /tmp/digits-idx
"""

import struct
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim  # unsigned bytes
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def main(out: str) -> None:
    digits = load_digits()
    images = torch.from_numpy(digits.images * (255 / 16)).float().unsqueeze(1)  # (N, 1, 8, 8), 0..255
    images = F.interpolate(images, size=(20, 20), mode="bilinear", antialias=True, align_corners=False)
    images = F.pad(images, (4, 4, 4, 4)).round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "t10k-images-idx3-ubyte", images)
    write_idx(folder / "t10k-labels-idx1-ubyte", digits.target)
    print(f"wrote {len(images)} digits, {images.shape[1]}x{images.shape[2]}, to {folder}")


if __name__ == "__main__":
    main(sys.argv[1])

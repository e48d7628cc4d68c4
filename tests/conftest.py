"""Shared test fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def tiny_tokenizer(seed: int = 0, **overrides):
    """The one tiny tokenizer of the tests, with random weights from `seed`, in eval mode: the "tiny"
    preset (32x32 images -> 8x8 tokens, 512 codes) unless `overrides` change its config. Also a fixture
    (`make_tokenizer`); scripts outside pytest (docs/make_reliability.py) import it."""
    from clusterar.tokenizer import VQModel, vq_preset

    torch.manual_seed(seed)
    return VQModel(vq_preset("tiny", **overrides)).eval()


@pytest.fixture(scope="session")
def make_tokenizer():
    """tiny_tokenizer, for tests and fixtures."""
    return tiny_tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny ops: on a shared 2-core machine a second thread only adds
    synchronisation, which can cost ~50x. Modules opt in with `pytestmark = usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _torchrun_command(args: list[str], command: str = "train") -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [*cmd, "-m", "clusterar", command, *args]


@pytest.fixture(scope="session")
def torchrun_command():
    """The command line `torchrun --standalone --nproc_per_node 2 -m clusterar train ARGS` (this Python)."""
    return _torchrun_command


@pytest.fixture(scope="session")
def torchrun():
    """Run `clusterar COMMAND ARGS` (train by default) in 2 gloo processes under torchrun, one thread each;
    `env` adds variables."""

    def run(
        args: list[str], cwd: Path, env: dict[str, str] | None = None, command: str = "train"
    ) -> subprocess.CompletedProcess:
        full = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        return subprocess.run(
            _torchrun_command(args, command), cwd=cwd, env=full, capture_output=True, text=True, timeout=300
        )

    return run


# ----------------------------------------------------------------------------- a labelled colour folder

SHAPE_CLASSES = ("blue-bars", "green-disc", "red-square")


def _shape_image(cls: int, rng: np.random.Generator) -> Image.Image:
    """A colour image of class `cls` at a random (often non-square) size: a coloured shape on noise."""
    w, h = int(rng.integers(28, 60)), int(rng.integers(28, 60))
    img = rng.integers(0, 80, (h, w, 3)).astype(np.float64)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    cy, cx = rng.uniform(0.4, 0.6, 2)
    if cls == 0:
        mask = (np.sin(yy * 25) > 0) & (abs(xx - cx) < 0.35)
    elif cls == 1:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 0.08
    else:
        mask = (abs(yy - cy) < 0.25) & (abs(xx - cx) < 0.25)
    colour = np.zeros(3)
    colour[2 - cls] = rng.uniform(180, 255)
    img[mask] = colour
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def _write_shapes(root, n_train=24, n_val=8, seed=0, splits=True):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(SHAPE_CLASSES):
            d = (root / split / name) if splits else (root / name)
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _shape_image(c, rng).save(d / f"{split}{i}.{'jpg' if i % 2 else 'png'}")
    return root


@pytest.fixture(scope="session")
def shapes():
    """Writers of a small labelled colour image folder (3 classes told apart by colour and shape, images
    of many sizes): `shapes.write(root, n_train, n_val, seed, splits)` and `shapes.image(cls, rng)`."""
    from types import SimpleNamespace

    return SimpleNamespace(write=_write_shapes, image=_shape_image, CLASSES=SHAPE_CLASSES)

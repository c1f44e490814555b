"""Datasets for the experiments, none downloaded at run time.

* ``digits`` — scikit-learn's 8×8 handwritten digits (1797 images, shipped inside the wheel):
  the embedded default, small enough for a CPU.
* ``fashion-mnist`` — the 28×28 Fashion-MNIST (60 000 + 10 000 images) from the Debian package
  ``dataset-fashion-mnist`` (IDX files under ``/usr/share/datasets/fashion-mnist/``;
  ``make data`` installs it where apt is available), or from any folder holding the four IDX
  files (``--data-path``).
* ``shapes`` — synthetic segmentation (discs and squares on a noisy background,
  :mod:`lnb.shapes`).

Pixels are scaled to ``[0, 1]``; ``inverted=True`` gives ``1 − x``, the paper's test of affine
invariance (§5.2). Images are NHWC.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
NAMES = ("digits", "fashion-mnist", "shapes")


class MissingDatasetError(FileNotFoundError):
    """An optional dataset is not installed; the message says how to get it."""


class DataError(ValueError):
    """A dataset file is unreadable or corrupt, or the data do not fit what was asked of them
    (a batch larger than the training set); the message names the file or the sizes."""


@dataclass(frozen=True)
class Dataset:
    """Arrays of one dataset and what they are.

    Attributes:
        name: e.g. ``"digits"`` or ``"digits (inverted)"``.
        x_train, y_train, x_test, y_test: images ``(n, H, W, C)`` float32 in [0, 1]; integer
            labels ``(n,)`` (classification) or masks ``(n, H, W)`` (segmentation).
        n_classes: number of classes.
        task: ``"classification"`` or ``"segmentation"``.
        source: where the data came from (for the JSON and the docs).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    task: str
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def inverted(self) -> Dataset:
        """The same data with every pixel ``x ↦ 1 − x`` (the paper's inverted inputs, §5.2)."""
        return replace(
            self,
            name=f"{self.name} (inverted)",
            x_train=(1.0 - self.x_train).astype(np.float32),
            x_test=(1.0 - self.x_test).astype(np.float32),
        )

    def summary(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "n_train": int(len(self.x_train)),
            "n_test": int(len(self.x_test)),
            "input_shape": list(self.input_shape),
            "n_classes": self.n_classes,
            "task": self.task,
        }


def digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's digits: 1797 8×8 grey images of 10 classes, pixels ``/16``; a stratified
    random split (``seed``) with ``test_fraction`` held out."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset("digits", x_tr, y_tr, x_te, y_te, 10, "classification", "sklearn.load_digits")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format; ``.gz`` or not) as a NumPy array.

    Raises:
        DataError: naming ``path`` if it cannot be read, is not gzip data (``.gz``), or is not
            a complete IDX file of unsigned bytes.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # unreadable, not gzip, truncated gzip
        raise DataError(f"cannot read {path}: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise DataError(f"{path}: header says {shape} but holds {array.size} values")
    return array.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist(path: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST from its four IDX files in ``path`` (default: the Debian package's folder).

    Raises:
        MissingDatasetError: if the files are not there, saying how to install them.
    """
    folder = Path(path) if path is not None else FASHION_DIR
    files = {key: _find(folder, stem) for key, stem in FASHION_FILES.items()}
    missing = [FASHION_FILES[k] for k, v in files.items() if v is None]
    if missing:
        raise MissingDatasetError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}). Install the "
            "Debian package with `make data` (sudo apt-get install dataset-fashion-mnist), or "
            "pass --data-path to a folder holding the four IDX files (.gz or not)."
        )
    arrays = {key: read_idx(p) for key, p in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise DataError(
                f"{files[f'x_{split}']} and {files[f'y_{split}']} are not images (n, H, W) and "
                f"their n labels: shapes {x.shape} and {y.shape}"
            )
        if y.max() >= 10:
            raise DataError(f"{files[f'y_{split}']}: label {int(y.max())} outside 0-9")
    scale = lambda x: (x.astype(np.float32) / 255.0)[..., None]  # noqa: E731
    return Dataset(
        "fashion-mnist",
        scale(arrays["x_train"]),
        arrays["y_train"].astype(np.int32),
        scale(arrays["x_test"]),
        arrays["y_test"].astype(np.int32),
        10,
        "classification",
        str(folder),
    )


def shapes(n_train: int = 2000, n_test: int = 500, size: int = 32, seed: int = 0) -> Dataset:
    """Synthetic segmentation: discs and squares on a noisy background (:mod:`lnb.shapes`)."""
    from .shapes import N_CLASSES, synthetic_shapes

    x_tr, y_tr = synthetic_shapes(n_train, size=size, seed=seed)
    x_te, y_te = synthetic_shapes(n_test, size=size, seed=seed + 10_000)
    return Dataset("shapes", x_tr, y_tr, x_te, y_te, N_CLASSES, "segmentation", "lnb.shapes")


def load(name: str, *, seed: int = 0, path: str | None = None, inverted: bool = False) -> Dataset:
    """A dataset by name (``digits``, ``fashion-mnist``, ``shapes``), optionally inverted."""
    if name == "digits":
        data = digits(seed)
    elif name == "fashion-mnist":
        data = fashion_mnist(path)
    elif name == "shapes":
        data = shapes(seed=seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    return data.inverted() if inverted else data


def subset(data: Dataset, n_train: int | None, n_test: int | None, seed: int = 0) -> Dataset:
    """A random subset (the same for every optimizer given ``seed``), to fit a CPU budget."""
    rng = np.random.default_rng(seed)
    out = data
    if n_train is not None and n_train < len(data.x_train):
        idx = np.sort(rng.choice(len(data.x_train), n_train, replace=False))
        out = replace(out, x_train=out.x_train[idx], y_train=out.y_train[idx])
    if n_test is not None and n_test < len(data.x_test):
        idx = np.sort(rng.choice(len(data.x_test), n_test, replace=False))
        out = replace(out, x_test=out.x_test[idx], y_test=out.y_test[idx])
    return out

"""Synthetic segmentation: discs and squares on a noisy background (nothing to download).

Every image holds 1–3 shapes, each a disc (class 1) or an axis-aligned square (class 2) of
random centre and size; shapes may overlap and a later one overwrites the labels of an earlier
one. Within an image both shape classes share one random intensity and the background another
(at least :data:`MIN_CONTRAST` apart), all drawn per image, so a pixel's intensity does not say
its class: across the dataset the three classes have the same intensity distribution, and only
the local geometry (round or square outline, inside or outside) separates them. Gaussian noise
is added on top.

Example::

    x, y = synthetic_shapes(100, size=32, seed=0)   # x: (100, 32, 32, 1) float32, y: (100, 32, 32)
    mean_iou(predicted_labels, y, N_CLASSES)
"""

from __future__ import annotations

import numpy as np

#: Classes: 0 background, 1 disc, 2 square.
N_CLASSES = 3
BACKGROUND, DISC, SQUARE = 0, 1, 2
#: Smallest difference between an image's shape intensity and its background intensity.
MIN_CONTRAST = 0.25
#: Intensities (shape and background) are drawn uniformly from this range.
INTENSITY_RANGE = (0.1, 0.9)


def synthetic_shapes(
    n: int, size: int = 32, seed: int = 0, noise: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy images of discs and squares and their segmentation masks.

    Per image: background intensity ``b`` and shape intensity ``f`` uniform on
    ``[0.1, 0.9]`` with ``|f − b| ≥ 0.25``; 1–3 shapes, each a disc (radius ``r``) or a square
    (half side ``r``) with ``r`` uniform in ``[size/8, size/4]`` and a centre at least ``r``
    from the border; pixel ``= f`` inside a shape, ``b`` outside, plus ``N(0, noise²)``.

    Args:
        n: number of images.
        size: side of the square images (≥ 8).
        seed: seed of the generator (the same seed gives the same arrays).
        noise: standard deviation of the additive Gaussian noise.

    Returns:
        ``(images, masks)``: ``(n, size, size, 1)`` float32, roughly in ``[0, 1]``, and
        ``(n, size, size)`` int32 labels in ``{0, 1, 2}`` (background, disc, square).
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    rng = np.random.default_rng(seed)
    lo, hi = INTENSITY_RANGE
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    images = np.empty((n, size, size), dtype=np.float64)
    masks = np.zeros((n, size, size), dtype=np.int32)
    for i in range(n):
        background = rng.uniform(lo, hi)
        foreground = rng.uniform(lo, hi)
        while abs(foreground - background) < MIN_CONTRAST:
            foreground = rng.uniform(lo, hi)
        mask = masks[i]
        for _ in range(rng.integers(1, 4)):
            kind = int(rng.integers(DISC, SQUARE + 1))
            r = rng.uniform(size / 8, size / 4)
            cy, cx = rng.uniform(r, size - r, size=2)
            if kind == DISC:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            else:
                inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
            mask[inside] = kind
        images[i] = np.where(mask > 0, foreground, background)
    images += rng.normal(0.0, noise, size=images.shape)
    return images[..., None].astype(np.float32), masks


def mean_iou(pred_labels: np.ndarray, true_labels: np.ndarray, n_classes: int) -> float:
    """Mean intersection over union of integer label maps.

    ``IoU_c = |{pred = c} ∩ {true = c}| / |{pred = c} ∪ {true = c}|``, averaged over the
    classes ``c < n_classes`` present in either array (a class absent from both does not count).

    Args:
        pred_labels: predicted labels, any shape.
        true_labels: true labels, the same shape.
        n_classes: number of classes; labels must lie in ``[0, n_classes)``.

    Returns:
        The mean IoU in ``[0, 1]`` (``nan`` for empty arrays).
    """
    pred, true = np.asarray(pred_labels), np.asarray(true_labels)
    if pred.shape != true.shape:
        raise ValueError(f"shapes differ: predictions {pred.shape}, labels {true.shape}")
    for what, a in (("predictions", pred), ("labels", true)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{what} must lie in [0, {n_classes}), got [{a.min()}, {a.max()}]")
    ious = []
    for c in range(n_classes):
        p, t = pred == c, true == c
        union = np.count_nonzero(p | t)
        if union:
            ious.append(np.count_nonzero(p & t) / union)
    return float(np.mean(ious)) if ious else float("nan")

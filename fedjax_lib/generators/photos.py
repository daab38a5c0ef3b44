"""``sample-photos``: random crops of the two photographs scikit-learn ships, offline.

``sklearn.datasets.load_sample_images()`` holds ``china.jpg`` and ``flower.jpg`` (427×640×3
uint8). `sample_photos` draws, from ``numpy.random.default_rng(seed)``, for each crop: the
photograph (uniform), a square side ``s ~ U{min_size, …, max_size}``, a position (uniform over
the positions where the square fits) and a horizontal flip (probability ½); the crop is
resized to ``resolution × resolution`` by an antialiased linear (triangle) filter, the filter
of ``jax.image.resize(..., 'linear', antialias=True)``, applied as two matrix products, and
normalised as PFLlib does: ``v' = (v / 255 − 0.5) / 0.5 ∈ [-1, 1]``.

It is the "not the clients' data" choice for training a generator: FedKTL's point is that the
generator's semantics need not match the clients' (the paper uses generators pre-trained on
unrelated data). The generators' data loader accepts it by name; it is not one of the
library's federated datasets.
"""

from __future__ import annotations

import functools

import numpy as np

from fedjax_lib import memory
from fedjax_lib.errors import DataError

NAME = "sample-photos"
DEFAULT_NUM_CROPS = 4096


def triangle_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``[out_size, in_size]`` float32 weights of an antialiased 1-D linear resize.

  Output pixel ``i`` sits at ``u_i = (i + 0.5)·in/out − 0.5`` in input coordinates; input
  pixel ``j`` gets the weight ``max(0, 1 − |u_i − j| / k)`` with ``k = max(in/out, 1)`` (the
  triangle widened by the downscaling factor), and each row is normalised to sum to 1.
  """
  scale = in_size / out_size
  width = max(scale, 1.0)
  centres = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  distance = np.abs(centres[:, None] - np.arange(in_size, dtype=np.float64)[None, :]) / width
  weights = np.maximum(0.0, 1.0 - distance)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _photographs() -> tuple[np.ndarray, ...]:
  from sklearn import datasets  # pylint: disable=import-outside-toplevel  (heavy import)
  try:
    return tuple(np.asarray(image, np.uint8) for image in datasets.load_sample_images().images)
  except Exception as e:  # pylint: disable=broad-except  (boundary: a broken installation)
    raise DataError(f"{NAME}: cannot read scikit-learn's sample images "
                    f"({type(e).__name__}: {e}); reinstall scikit-learn (and Pillow)") from None


def sample_photos(num_crops: int = DEFAULT_NUM_CROPS, resolution: int = 32, seed: int = 0,
                  min_size: int = 48, max_size: int = 256) -> np.ndarray:
  """``num_crops`` random square crops of scikit-learn's two photographs (module docstring).

  Args:
    num_crops: number of crops ``N`` (>= 1).
    resolution: side of the returned images.
    seed: seed of the numpy generator; same arguments, same array.
    min_size: smallest crop side, in pixels of the photograph.
    max_size: largest crop side (at most 427, the photographs' height).

  Returns:
    float32 ``[N, resolution, resolution, 3]`` in ``[-1, 1]``.

  Raises:
    DataError: an argument outside what is accepted.
  """
  photos = _photographs()
  largest = min(min(photo.shape[:2]) for photo in photos)
  for name, value in (("num_crops", num_crops), ("resolution", resolution),
                      ("min_size", min_size), ("max_size", max_size)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise DataError(f"{NAME}: {name}={value!r} must be an int >= 1")
  if not min_size <= max_size <= largest:
    raise DataError(f"{NAME}: crop sides must satisfy 1 <= min_size <= max_size <= {largest}, "
                    f"got min_size={min_size}, max_size={max_size}")
  # the crops (float32, and the scaled copy returned) and five draws per crop
  needed = num_crops * (2 * resolution * resolution * 3 * 4 + 5 * 8)
  available = memory.available_bytes()
  if available is not None and needed > available:
    raise DataError(f"{NAME}: num_crops={num_crops} at resolution {resolution} needs "
                    f"{needed / 2**30:.1f} GB, more than the {available / 2**30:.1f} GB "
                    "available; use fewer crops (--num-photos)")
  rng = np.random.default_rng(seed)
  which = rng.integers(0, len(photos), size=num_crops)
  sides = rng.integers(min_size, max_size + 1, size=num_crops)
  row_frac, col_frac = rng.random(num_crops), rng.random(num_crops)
  flips = rng.random(num_crops) < 0.5
  out = np.empty((num_crops, resolution, resolution, 3), np.float32)
  matrices = {}
  for n in range(num_crops):
    photo, side = photos[which[n]], int(sides[n])
    top = int(row_frac[n] * (photo.shape[0] - side + 1))
    left = int(col_frac[n] * (photo.shape[1] - side + 1))
    crop = photo[top:top + side, left:left + side].astype(np.float32)
    if flips[n]:
      crop = crop[:, ::-1]
    if side not in matrices:
      matrices[side] = triangle_resize_matrix(side, resolution)
    resize = matrices[side]                                        # [r, s]
    rows = (resize @ crop.reshape(side, side * 3)).reshape(resolution, side, 3)
    out[n] = resize @ rows                                         # [r, r, 3]
  return np.clip((out / 255.0 - 0.5) / 0.5, -1.0, 1.0).astype(np.float32)

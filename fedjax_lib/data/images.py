"""Image preprocessing as PFLlib's torchvision transforms do it, on uint8 NHWC arrays.

* **Resize** (`resize`): PIL's bilinear filter, ``Image.resize((w, h), Image.BILINEAR)``.
  That is exactly what ``torchvision.transforms.Resize`` runs on the PIL images PFLlib's
  generators feed it (``Resize((64, 64))`` for Flowers102, Stanford Cars, DomainNet;
  ``Resize(32)`` for Digit5), antialiasing included when shrinking (PIL widens the filter
  support by the scale factor). The result is uint8 again, as the PIL image is before
  ``ToTensor``, so caching uint8 after the resize loses nothing.
* **RandomResizedCrop** (`random_resized_crop`): torchvision's ``get_params`` (10 tries of a
  uniform area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, else a
  centre crop), the crop then resized with the bilinear filter; the random numbers come from
  a numpy ``Generator``, not torch's.
* **Scaling** (`to_float`): ``ToTensor`` then ``Normalize(0.5, 0.5)``:
  :math:`v' = (v / 255 - 0.5) / 0.5 \\in [-1, 1]` (``"pm1"``), or ``ToTensor`` alone:
  :math:`v' = v / 255 \\in [0, 1]` (``"unit"``; PFLlib's DomainNet and Omniglot).
"""

from __future__ import annotations

import math

import numpy as np

VALUE_RANGES = ("pm1", "unit")


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """``[H, W(, c)]`` uint8 → ``[H, W, channels]``: grey repeated to RGB (PFLlib's Digit5
  stacks the grey plane three times), or the first plane kept for ``channels=1``."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == channels:
    return image
  if channels == 1:
    return image[..., :1]
  if image.shape[-1] == 1:
    return np.repeat(image, channels, axis=-1)
  raise ValueError(f"cannot turn an image with {image.shape[-1]} channels into {channels}")


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """``[h, w, c]`` uint8 → ``[height, width, c]`` uint8 with PIL's bilinear filter."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only needed when resizing)

  image = np.asarray(image, dtype=np.uint8)
  if image.shape[:2] == (height, width):
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out[..., None] if channels == 1 else out


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.75, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        flip: bool = True) -> np.ndarray:
  """torchvision's ``RandomResizedCrop(size, scale, ratio)`` then ``RandomHorizontalFlip()``.

  Crop box: for up to 10 tries, area fraction ``s ~ U(scale)`` and aspect ``r`` with
  ``log r ~ U(log ratio)``; ``w = round(sqrt(s·A·r))``, ``h = round(sqrt(s·A/r))``; the first
  box that fits is placed uniformly. Otherwise the largest centred box whose aspect lies in
  ``ratio``. The crop is resized to ``size × size`` (`resize`) and, with probability 1/2,
  mirrored left-right.
  """
  height, width = image.shape[:2]
  area = height * width
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  box = None
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_low, log_high))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      box = (top, left, h, w)
      break
  if box is None:
    in_ratio = width / height
    if in_ratio < ratio[0]:
      w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
      h, w = height, int(round(height * ratio[1]))
    else:
      w, h = width, height
    box = ((height - h) // 2, (width - w) // 2, h, w)
  top, left, h, w = box
  out = resize(image[top: top + h, left: left + w], size, size)
  if flip and rng.uniform() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def to_float(images: np.ndarray, value_range: str = "pm1") -> np.ndarray:
  """uint8 images → float32: ``(v/255 - 0.5)/0.5`` for ``"pm1"``, ``v/255`` for ``"unit"``."""
  if value_range not in VALUE_RANGES:
    raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")
  scaled = np.asarray(images, dtype=np.float32) / np.float32(255.0)
  if value_range == "pm1":
    scaled -= np.float32(0.5)
    scaled /= np.float32(0.5)
  return scaled

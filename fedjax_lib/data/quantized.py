"""`QuantizedImages`: uint8 images kept as stored, scaled to float32 when they are indexed.

A tfds image set is converted to uint8 once (`fedjax_lib.data.images`), and PFLlib's
preprocessing then scales every pixel to ``(v/255 - 0.5)/0.5`` (or ``v/255``). Holding the
scaled float32 copy costs 4 bytes a pixel on the host and again on the accelerator (DomainNet's
~590,000 64×64 images: 29 GB of float32; Tiny-ImageNet's 120,000: 5.9 GB); holding the uint8 pixels costs
1. A `QuantizedImages` holds the uint8 array and scales exactly the rows taken out of it:
``images[rows]`` is float32, bit-identical to `images.to_float` of those rows, on the host
(numpy) and inside compiled code (jax), so every ``data.x[rows]`` of the engine and the
algorithms reads it like the float array it replaces.

It is a pytree whose one leaf is the uint8 array (the value range is static), so it passes
through ``jit``, ``vmap`` and device placement as that array does; ``shape`` and ``ndim`` are
the array's, ``dtype`` is float32 (what indexing gives). ``np.asarray(images)`` scales the whole
array (for small consumers such as the DLG attack's value range).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

VALUE_RANGES = ("pm1", "unit")


def _table(value_range: str) -> np.ndarray:
  """The float32 value of each of the 256 pixel values, computed as `images.to_float` does."""
  scaled = np.arange(256, dtype=np.float32) / np.float32(255.0)
  if value_range == "pm1":
    scaled -= np.float32(0.5)
    scaled /= np.float32(0.5)
  return scaled


_TABLES = {value_range: _table(value_range) for value_range in VALUE_RANGES}


def scale(raw, value_range: str):
  """uint8 pixels → float32 ``(v/255 - 0.5)/0.5`` (``"pm1"``) or ``v/255`` (``"unit"``).

  A lookup in a 256-entry table computed in numpy: arithmetic in compiled code would be
  rewritten by XLA (``v · (2/255) - 1``) and differ from the float32 copy in the last bit."""
  table = _TABLES[value_range]
  if isinstance(raw, np.ndarray):
    return table[raw]
  return jnp.asarray(table)[raw.astype(jnp.int32)]


@jax.tree_util.register_pytree_node_class
class QuantizedImages:
  """uint8 images ``raw [N, ...]`` that read as float32 in ``value_range`` when indexed.

  Args:
    raw: the uint8 pixels (numpy on the host, a jax array on a device, a tracer in jit).
    value_range: ``"pm1"`` (Normalize(0.5, 0.5) → [-1, 1]) or ``"unit"`` ([0, 1]).
  """

  def __init__(self, raw, value_range: str = "pm1"):
    if value_range not in VALUE_RANGES:
      raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")
    if hasattr(raw, "dtype") and raw.dtype != np.uint8:
      raise ValueError(f"QuantizedImages holds uint8 pixels, got dtype {raw.dtype}")
    self.raw = raw
    self.value_range = value_range

  def tree_flatten(self):
    return (self.raw,), self.value_range

  @classmethod
  def tree_unflatten(cls, value_range, children):
    obj = object.__new__(cls)  # leaves may be tracers or sharding specs, not uint8 arrays
    obj.raw, obj.value_range = children[0], value_range
    return obj

  def __getitem__(self, index):
    return scale(self.raw[index], self.value_range)

  def __len__(self) -> int:
    return len(self.raw)

  def __array__(self, dtype=None, copy=None):
    del copy
    out = scale(np.asarray(self.raw), self.value_range)
    return out if dtype is None else out.astype(dtype)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.raw.shape)

  @property
  def ndim(self) -> int:
    return len(self.raw.shape)

  @property
  def dtype(self):
    return np.dtype(np.float32)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.raw.shape))

  def devices(self):
    return self.raw.devices()

  def __repr__(self) -> str:
    return f"QuantizedImages(shape={self.shape}, value_range={self.value_range!r})"

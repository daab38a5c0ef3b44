"""Heads other than one dense layer: HtFLlib's heterogeneous classifier heads.

HtFLlib's ``Head(hidden_dims=[d0, d1, ...], num_classes=C)`` is the stack
``Linear(d0, d1) → ReLU → Linear(d1, d2) → ReLU → … → Linear(d_last, C) → ReLU``: every
layer, the last included, is followed by a ReLU, so its logits are non-negative. That is how
HtFLlib's HtC families (``HtFE-img-8-HtC-img-4``, ``Res34-HtC-img-4``) define their four
heads, ``[512]``, ``[512, 512]``, ``[512, 256]`` and ``[512, 128]``; it is reproduced here
as the architecture those families specify (a model definition, not an algorithm's bug).
``d0`` is the head's input width, the feature dimension.
"""

from typing import Any, Optional

import jax
import flax.linen as nn

from fedjax_lib.models.layers import TorchDense


class MLPHead(nn.Module):
  """HtFLlib's ``Head(hidden_dims, num_classes)`` (see the module docstring).

  Attributes:
    hidden_dims: ``(d0, d1, ...)``; ``d0`` must equal the width of the features it receives.
    num_classes: number of logits.
    dtype: the computation dtype (``None``: float32).
  """
  hidden_dims: tuple
  num_classes: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    if z.shape[-1] != self.hidden_dims[0]:
      raise ValueError(f'head {list(self.hidden_dims)} expects {self.hidden_dims[0]}-d '
                       f'features, got {z.shape[-1]}')
    for i, width in enumerate((*self.hidden_dims[1:], self.num_classes)):
      z = nn.relu(TorchDense(width, dtype=self.dtype, name=f'fc{i}')(z))
    return z

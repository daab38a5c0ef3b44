"""Weighted averages of stacked pytrees (the server side of FedAvg and friends).

These are plain array functions over the leading (client) axis. On several devices the engine
calls ``server_update`` on global arrays whose client axis is sharded over the ``clients``
mesh axis, and XLA partitions the reductions (a local sum and an all-reduce), so a server —
linear or not — is the same code on one device and on many and its result is replicated by
construction (tests/test_sharding.py checks both).
"""

import jax
import jax.numpy as jnp


def client_sum(x: jax.Array, axis: int = 0) -> jax.Array:
  """Sum over the stacked client axis."""
  return jnp.sum(x, axis=axis)


def normalized_weights(weights: jax.Array) -> jax.Array:
  """``w / Σw`` in float32, all zeros when ``Σw == 0``."""
  weights = jnp.asarray(weights, jnp.float32)
  total = client_sum(weights)
  return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def weighted_average(stacked, weights: jax.Array, fallback=None):
  """``Σ_k w_k θ_k / Σ_k w_k`` over the leading axis of every leaf of ``stacked``.

  Args:
    stacked: a pytree whose leaves have a leading axis of length K (one slice per client).
    weights: ``[K]`` non-negative weights (sample counts; zero for dropped clients).
    fallback: returned (leaf-wise) when all weights are zero; defaults to the unweighted mean.

  Returns:
    The averaged pytree, leaves without the leading axis, in each leaf's dtype.
  """
  weights = jnp.asarray(weights, jnp.float32)
  total = client_sum(weights)
  norm = normalized_weights(weights)
  count = client_sum(jnp.ones_like(weights))

  def avg(leaf, fb=None):
    mean = client_sum(jnp.tensordot(norm, leaf.astype(jnp.float32), axes=1)[None])
    mean = mean.astype(leaf.dtype)
    if fb is None:
      fb = (client_sum(leaf.astype(jnp.float32)) / count).astype(leaf.dtype)
    return jnp.where(total > 0, mean, fb)

  if fallback is None:
    return jax.tree.map(avg, stacked)
  return jax.tree.map(avg, stacked, fallback)


def uniform_average(uploads, weights: jax.Array, fallback):
  """The unweighted mean of the uploads whose weight is positive (``fallback`` when none):
  the servers that average ``1/#clients that trained``, not by sample count."""
  return weighted_average(uploads, (jnp.asarray(weights) > 0).astype(jnp.float32),
                          fallback=fallback)


def arrived_sum(uploads, weights):
  """``Σ_{k: w_k > 0} u_k`` over the leading axis of every leaf, in float32 (slots of weight 0
  are excluded by a select, so whatever they hold never reaches the result)."""
  kept = jnp.asarray(weights) > 0

  def leaf(u):
    mask = kept.reshape((-1,) + (1,) * (u.ndim - 1))
    return jnp.where(mask, u.astype(jnp.float32), 0.0).sum(0)

  return jax.tree.map(leaf, uploads)

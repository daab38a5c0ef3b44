"""Weighted averages of stacked pytrees (the server side of FedAvg and friends)."""

import jax
import jax.numpy as jnp


def normalized_weights(weights: jax.Array) -> jax.Array:
  """``w / Σw`` in float32, all zeros when ``Σw == 0``."""
  weights = jnp.asarray(weights, jnp.float32)
  total = weights.sum()
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
  total = weights.sum()
  norm = normalized_weights(weights)

  def avg(leaf, fb=None):
    mean = jnp.tensordot(norm, leaf.astype(jnp.float32), axes=1).astype(leaf.dtype)
    if fb is None:
      fb = leaf.mean(axis=0).astype(leaf.dtype)
    return jnp.where(total > 0, mean, fb)

  if fallback is None:
    return jax.tree.map(avg, stacked)
  return jax.tree.map(avg, stacked, fallback)

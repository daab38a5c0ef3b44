"""Why the CPU defaults are what they are: one client's local steps and forward passes, per
convolution implementation and loop form, on the 4-layer CNN.

Training: ``--steps`` SGD steps of batch 10 (a client with ``n`` valid steps out of the
round's ``--steps``) as (a) all steps unrolled with the invalid ones masked by a select (the
old CPU default), (b) a ``fori_loop`` over the valid steps only, (c) each step inside a
``lax.cond``, (d) one jitted step dispatched per step from Python. Forward: one jitted forward
pass over batches of 10 … 1,341 samples (evaluation). Milliseconds, mean of ``--reps`` calls
after a warm-up call, every configuration in this one process.

    python experiments/benchmarks/bench_cpu_step.py --shape 28,28,1
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

from fedjax_lib.models.cnn import FedAvgCNN  # pylint: disable=wrong-import-position


def mean_ms(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps * 1e3


def training_forms(impl: str, shape, steps: int):
  model = FedAvgCNN(10, conv_impl=impl)
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(1341, *shape).astype(np.float32))
  y = jnp.asarray(rs.randint(0, 10, 1341))
  params = model.init(jax.random.key(0), x[:1])
  grad = jax.grad(lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
      model.apply(p, xb), yb).mean())

  def sgd(p, s):
    rows = (jnp.arange(10) + s * 10) % x.shape[0]
    return jax.tree.map(lambda a, g: a - 0.005 * g, p, grad(p, x[rows], y[rows]))

  def unrolled(p, n):
    for s in range(steps):
      p = jax.tree.map(lambda new, old, s=s: jnp.where(s < n, new, old), sgd(p, s), p)
    return p

  def valid_loop(p, n):
    return jax.lax.fori_loop(0, n, lambda s, p: sgd(p, s), p)

  def conds(p, n):
    for s in range(steps):
      p = jax.lax.cond(s < n, lambda p, s=s: sgd(p, s), lambda p: p, p)
    return p

  one = jax.jit(sgd)

  def per_step(p, n):
    for s in range(int(n)):
      p = one(p, s)
    return p

  return params, {"unrolled, masked": jax.jit(unrolled), "fori_loop over valid steps":
                  jax.jit(valid_loop), "lax.cond per step": jax.jit(conds),
                  "one dispatch per step": per_step}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="28,28,1", help="H,W,C of one sample")
  p.add_argument("--steps", type=int, default=11, help="steps of the round's largest client")
  p.add_argument("--valid", default="11,6", help="valid steps of the clients timed")
  p.add_argument("--impls", default="lax,slices,hybrid")
  p.add_argument("--batches", default="10,37,111,1341", help="forward-pass batch sizes")
  p.add_argument("--reps", type=int, default=20)
  args = p.parse_args()
  shape = tuple(int(v) for v in args.shape.split(","))
  impls = args.impls.split(",")
  print(f"Measured {datetime.date.today().isoformat()} on {platform.machine()} "
        f"({os.cpu_count()} cores), jax {jax.__version__} ({jax.default_backend()}), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}. FedAvgCNN on {shape} samples.\n"
        f"Command: `python experiments/benchmarks/bench_cpu_step.py {' '.join(sys.argv[1:])}`\n")
  print(f"Training, ms per client of n valid steps (the round's largest client: {args.steps}):"
        "\n")
  print("| conv_impl | form | " + " | ".join(f"n = {n}" for n in args.valid.split(",")) + " |")
  print("|---|---|" + "---|" * len(args.valid.split(",")))
  for impl in impls:
    params, forms = training_forms(impl, shape, args.steps)
    for name, fn in forms.items():
      host = name == "one dispatch per step"  # its step count is a Python int
      cells = [f"{mean_ms(fn, params, int(n) if host else jnp.int32(int(n)), reps=args.reps):.1f}"
               for n in args.valid.split(",")]
      print(f"| {impl} | {name} | " + " | ".join(cells) + " |", flush=True)
  print("\nForward pass (evaluation), ms per batch:\n")
  batches = [int(b) for b in args.batches.split(",")]
  print("| conv_impl | " + " | ".join(f"batch {b}" for b in batches) + " |")
  print("|---|" + "---|" * len(batches))
  for impl in impls:
    model = FedAvgCNN(10, conv_impl=impl)
    cells = []
    for b in batches:
      x = jnp.asarray(np.random.RandomState(0).randn(b, *shape).astype(np.float32))
      variables = model.init(jax.random.key(0), x[:1])
      cells.append(f"{mean_ms(jax.jit(model.apply), variables, x, reps=args.reps):.2f}")
    print(f"| {impl} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()

"""Forward and training-step cost of HtFLlib's image architectures on XLA:CPU, by convolution
rule, side by side with PyTorch in one invocation.

For each architecture (3×32×32 inputs, 10 classes, HtFLlib's 512-feature bases), milliseconds
per sample of

- an evaluation-mode forward pass at batch 10, 25 and 100 (a client's test split and its
  training set, as the evaluation passes them), and
- one SGD step at batch 10 (forward + backward, training mode),

under the current ``conv_impl='auto'`` rule and under the rule before 2026-12-01 (``'slices'``
up to batch 16, XLA's convolution above it and for every grouped convolution), each the best
of ``--reps`` calls after a compiling call; PyTorch's rows (``torch_htfl.py``'s models, eval
mode under ``no_grad``, ``--torch-threads`` threads) come from a subprocess run with
``--torch-python`` in the same invocation.

    python experiments/benchmarks/bench_cpu_forward.py --torch-python /tmp/torchenv/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

ARCHITECTURES = ("cnn", "googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50",
                 "resnet101", "resnet152")
BATCHES = (10, 25, 100)

_TORCH_SNIPPET = r"""
import json, sys, time, torch
sys.path.insert(0, {here!r})
torch.set_num_threads({threads})
import torch_htfl as th
out = {{}}
for arch in {archs!r}:
  model = th.BaseHeadSplit(arch)
  rows = {{}}
  model.eval()
  for b in {batches!r}:
    x = torch.randn(b, 3, 32, 32)
    with torch.no_grad():
      model(x)
      times = []
      for _ in range({reps}):
        t = time.perf_counter(); model(x); times.append(time.perf_counter() - t)
    rows[f"eval{{b}}"] = min(times) / b * 1e3
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01)
  x, y = torch.randn(10, 3, 32, 32), torch.randint(0, 10, (10,))
  times = []
  for i in range({reps} + 1):
    t = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    if i: times.append(time.perf_counter() - t)
  rows["step10"] = min(times) / 10 * 1e3
  out[arch] = rows
print(json.dumps({{"rows": out, "torch": torch.__version__}}))
"""


def old_rule(conv_impl, feature_group_count=1, batch=1, output_area=None, depthwise=False):
  """``resolve_conv_impl`` before 2026-12-01: batch size alone, grouped ones to ``'lax'``."""
  del output_area, depthwise
  import jax  # pylint: disable=import-outside-toplevel
  if conv_impl != "auto":
    return conv_impl
  if feature_group_count != 1 or jax.default_backend() != "cpu":
    return "lax"
  return "slices" if batch <= 16 else "hybrid"


def jax_rows(archs, reps: int, rule: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models import layers, zoo  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models.base import apply_train  # pylint: disable=import-outside-toplevel

  current = layers.resolve_conv_impl
  layers.resolve_conv_impl = old_rule if rule == "old" else current

  def best(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    return min(times)

  out = {}
  try:
    for arch in archs:
      model = zoo.make_model(arch, (32, 32, 3), 10)
      variables = zoo.init_model(model, jax.random.key(0), (32, 32, 3))
      rows = {}
      rs = np.random.RandomState(0)
      for b in BATCHES:
        x = jnp.asarray(rs.randn(b, 32, 32, 3).astype(np.float32))
        forward = jax.jit(model.apply)
        rows[f"eval{b}"] = best(forward, variables, x) / b * 1e3
      x = jnp.asarray(rs.randn(10, 32, 32, 3).astype(np.float32))
      y = jnp.asarray(rs.randint(0, 10, 10))

      @jax.jit
      def step(v, x, y, key):
        def loss(params):
          (_, logits), state = apply_train(model, {**v, "params": params}, x, key)
          del state
          return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        grads = jax.grad(loss)(v["params"])
        return jax.tree.map(lambda p, g: p - 0.01 * g, v["params"], grads)

      rows["step10"] = best(step, variables, x, y, jax.random.key(1)) / 10 * 1e3
      out[arch] = rows
      print(f"jax {rule} {arch}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows.items()),
            flush=True)
  finally:
    layers.resolve_conv_impl = current
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--archs", default=",".join(ARCHITECTURES))
  parser.add_argument("--rules", default="current,old", help="current, old or both")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--torch-python", default=None)
  parser.add_argument("--torch-threads", type=int, default=2)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  archs = tuple(args.archs.split(","))

  import jax  # pylint: disable=import-outside-toplevel
  result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "versions": {"jax": jax.__version__, "python": platform.python_version()},
            "unit": "ms per sample (best of reps)", "rows": {}}
  for rule in args.rules.split(","):
    result["rows"][f"jax_{rule}"] = jax_rows(archs, args.reps, rule)
  if args.torch_python:
    snippet = _TORCH_SNIPPET.format(here=HERE, threads=args.torch_threads, archs=archs,
                                    batches=BATCHES, reps=args.reps)
    done = subprocess.run([args.torch_python, "-c", snippet], capture_output=True, text=True,
                          check=True)
    torch_out = json.loads(done.stdout.strip().splitlines()[-1])
    result["rows"][f"torch_{args.torch_threads}threads"] = torch_out["rows"]
    result["versions"]["torch"] = torch_out["torch"]

  columns = [f"eval{b}" for b in BATCHES] + ["step10"]
  print("| architecture | implementation | " + " | ".join(
      f"forward, batch {c[4:]}" if c.startswith("eval") else "SGD step, batch 10"
      for c in columns) + " |")
  print("|---|---|" + "---|" * len(columns))
  for arch in archs:
    for name, rows in result["rows"].items():
      if arch in rows:
        print(f"| {arch} | {name} | " + " | ".join(f"{rows[arch][c]:.3f}" for c in columns)
              + " |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()

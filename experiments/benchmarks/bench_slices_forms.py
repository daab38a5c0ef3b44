"""Forms of the ``slices`` convolution (XLA:CPU's training steps), side by side in one process.

``conv_impl='slices'`` computes a convolution as im2col + matmul. Until 2026-12-02 it
concatenated all ``kh * kw`` shifted views of its input at once and multiplied with an
einsum, whose kernel gradient JAX writes as ``(dy.T @ patches).T``. The forms compared:

1. *one concatenation, einsum* (before);
2. *two passes, einsum*: the patches built by stacking the ``kw`` column shifts, then the
   ``kh`` row shifts of those (`fedjax_lib.models.layers._im2col`; the same patches);
3. *two passes, patch matmul* (now): the same patches times the kernel through
   `fedjax_lib.models.layers._patch_matmul`, whose kernel gradient is ``patches.T @ dy``.

Each program is compiled once per form in this one process (the form is chosen while the
program is traced) and the forms' calls alternate, so that a slow phase of the machine hits
them alike:

- ``step``: ``--steps`` SGD steps of the 4-layer CNN (batch 10, 28×28×1, a ``fori_loop``,
  the library's CPU loop): milliseconds per step;
- ``round``: ``--algorithm``'s rounds on the bundled digits as the CLI builds them (20
  clients, Dir(0.1), ``-m CNN -lbs 10 -ls 1 -lr 0.005 -jr 1 -eg 1``), two engines whose
  rounds alternate: training and evaluation seconds, and the median of the per-round ratio;
- ``archs``: one SGD step (batch 10, 3×32×32) of each of ``--archs`` (HtFLlib's image
  bases), with the compilation's seconds.

Medians over the calls (and the minimum for the step), each form's median against the first
form's, and the largest difference of the results from the first form's.

    python experiments/benchmarks/bench_slices_forms.py --what step,round,archs
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

from fedjax_lib.models import layers  # pylint: disable=wrong-import-position

# pylint: disable=protected-access


def _one_concatenation(x, kernel, strides, padding):
  """The form before 2026-12-02: all ``kh * kw`` shifted views concatenated at once."""
  kh, kw, fan, out = kernel.shape
  views = layers._shifted_views(x, (kh, kw), strides, padding)
  patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  return jnp.einsum("nhwp,po->nhwo", patches, kernel.reshape(kh * kw * fan, out))


def _two_passes_einsum(x, kernel, strides, padding):
  kh, kw, fan, out = kernel.shape
  patches = layers._im2col(x, (kh, kw), strides, padding)
  return jnp.einsum("nhwp,po->nhwo", patches, kernel.reshape(kh * kw * fan, out))


CONVS = {"one concatenation, einsum (before)": _one_concatenation,
         "two passes, einsum": _two_passes_einsum,
         "two passes, patch matmul (now)": layers._slices_conv}
FORMS = tuple(CONVS)
_FORM = [FORMS[-1]]


def _chosen_form(*args):
  return CONVS[_FORM[0]](*args)


def traced_as(form: str, fn, *args):
  """Calls ``fn`` (a first, compiling call) with the layers' convolution in ``form``."""
  _FORM[0] = form
  try:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start
  finally:
    _FORM[0] = FORMS[-1]


def max_difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64))))
             for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def alternate(calls: dict, reps: int) -> dict:
  """Seconds of each ``calls[form]()``, the forms alternating ``reps`` times."""
  seconds = {form: [] for form in calls}
  for _ in range(reps):
    for form, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      seconds[form].append(time.perf_counter() - start)
  return seconds


def step_rows(args) -> list:
  sys.path.insert(0, HERE)
  from bench_cpu_step import training_forms  # pylint: disable=import-outside-toplevel
  fns, outs = {}, {}
  for form in FORMS:  # bench_cpu_step's loop, built anew per form: its own trace
    params, forms = training_forms("slices", (28, 28, 1), args.steps)
    fns[form] = forms["fori_loop over valid steps"]
    outs[form], _ = traced_as(form, fns[form], params, args.steps)
  seconds = alternate({f: (lambda f=f: fns[f](params, args.steps)) for f in FORMS}, args.reps)
  return [row(f"SGD step, 4-layer CNN, batch 10, {args.steps} steps (ms per step)", {
      f: f"{np.median(seconds[f]) / args.steps * 1e3:.3f} (min "
         f"{min(seconds[f]) / args.steps * 1e3:.3f})" for f in FORMS}, seconds, outs)]


def row(name: str, cells: dict, seconds: dict, outs: dict) -> str:
  """A table row: each form's cell, then its median against the first form's and the
  largest difference of its result from the first form's."""
  first = np.median(seconds[FORMS[0]])
  return (f"| {name} | " + " | ".join(cells[f] for f in FORMS) + " | " + " / ".join(
      f"{np.median(seconds[f]) / first:.3f}" for f in FORMS[1:]) + " | " + " / ".join(
          f"{max_difference(outs[FORMS[0]], outs[f]):.1e}" for f in FORMS[1:]) + " |")


def round_rows(args) -> list:
  from fedjax_lib import Config  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import rng  # pylint: disable=import-outside-toplevel
  from fedjax_lib.runner import build  # pylint: disable=import-outside-toplevel
  cfg = Config(algorithm=args.algorithm, model="cnn", batch_size=10, local_epochs=1,
               learning_rate=0.005, join_ratio=1.0, eval_gap=1, progress=False)
  root = rng.root_key(0)
  runs = {}
  for form in FORMS:
    built = build(cfg)
    eng = built.engine
    server, clients = eng.init(root, built.data.x[0])
    traced_as(form, lambda s, c: eng.evaluate(s, c, root, 0), server, clients)
    (server, clients, _), _ = traced_as(form, lambda s, c: eng.run_round(s, c, root, 0),
                                        server, clients)
    runs[form] = {"engine": eng, "server": server, "clients": clients, "train": [],
                  "eval": []}
  for r in range(1, args.rounds + 1):
    for form in (FORMS if r % 2 else FORMS[::-1]):
      run = runs[form]
      eng, server, clients = run["engine"], run["server"], run["clients"]
      start = time.perf_counter()
      jax.block_until_ready(eng.evaluate(server, clients, root, r))
      middle = time.perf_counter()
      server, clients, _ = eng.run_round(server, clients, root, r)
      jax.block_until_ready((server, clients))
      run["eval"].append(middle - start)
      run["train"].append(time.perf_counter() - middle)
      run["server"], run["clients"] = server, clients
  outs = {f: runs[f]["server"] for f in FORMS}
  rows = [row(f"{args.algorithm} round, {phase} (s)",
              {f: f"{np.median(runs[f][phase]):.4f}" for f in FORMS},
              {f: runs[f][phase] for f in FORMS}, outs) for phase in ("train", "eval")]
  paired = {f: np.array(runs[f]["train"]) / np.array(runs[FORMS[0]]["train"]) for f in FORMS}
  rows.append(row(f"{args.algorithm} round, train: median of the per-round ratios",
                  {f: f"{np.median(paired[f]):.3f}" for f in FORMS}, paired, outs))
  return rows


def arch_rows(args) -> list:
  from fedjax_lib.models import zoo  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models.base import apply_train  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(10, 32, 32, 3).astype(np.float32))
  y = jnp.asarray(rs.randint(0, 10, 10))
  rows = []
  for arch in args.archs.split(","):
    model = zoo.make_model(arch, (32, 32, 3), 10)
    variables = zoo.init_model(model, jax.random.key(0), (32, 32, 3))

    def step(v, x, y, key, model=model):
      def loss(params):
        (_, logits), _ = apply_train(model, {**v, "params": params}, x, key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return jax.tree.map(lambda p, g: p - 0.01 * g, v["params"], jax.grad(loss)(v["params"]))

    fns, outs, compile_s = {}, {}, {}
    key = jax.random.key(1)
    for form in FORMS:
      fns[form] = jax.jit(lambda *a, step=step: step(*a))  # a new function: its own trace
      outs[form], compile_s[form] = traced_as(form, fns[form], variables, x, y, key)
    seconds = alternate({f: (lambda f=f: fns[f](variables, x, y, key)) for f in FORMS},
                        args.reps)
    rows.append(row(f"{arch}: SGD step, batch 10, 3×32×32 (ms); first call incl. compile (s)",
                    {f: f"{np.median(seconds[f]) * 1e3:.2f}; {compile_s[f]:.1f}"
                     for f in FORMS}, seconds, outs))
    print(rows[-1], flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--what", default="step,round,archs")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--algorithm", default="FedAvg")
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--archs", default="cnn,resnet18,googlenet,mobilenet_v2,resnet50")
  args = parser.parse_args()
  layers._slices_conv = _chosen_form  # pylint: disable=protected-access
  print(f"Measured {datetime.datetime.now().isoformat(timespec='minutes')} on "
        f"{platform.machine()} ({os.cpu_count()} cores), jax {jax.__version__} "
        f"({jax.default_backend()}), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}.\n"
        f"Command: `python experiments/benchmarks/bench_slices_forms.py {' '.join(sys.argv[1:])}`\n")
  print("| workload | " + " | ".join(FORMS) + " | median against the first (forms 2 / 3) | "
        "largest difference from the first (forms 2 / 3) |")
  print("|---|" + "---|" * (len(FORMS) + 2))
  table = {"step": step_rows, "round": round_rows, "archs": arch_rows}
  for what in args.what.split(","):
    for row in table[what](args):
      if what != "archs":
        print(row, flush=True)


if __name__ == "__main__":
  main()

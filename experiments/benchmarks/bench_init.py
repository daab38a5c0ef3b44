"""What the initial states cost: op by op (the sequential executor) against one compiled program.

``--models``: each architecture's flax ``init`` on one 3×32×32 sample (28×28×1 for ``cnn``) in
a fresh process, op by op and under ``jax.jit``, and a second ``init`` in the same process
(op by op, the operations compiled for the first one are reused; a new ``jax.jit`` compiles
again). ``--family``: the initialisation of a 20-client engine over an HtFLlib family
(Local, feature dim 512, client i on architecture i mod K) as the sequential executor runs it
(``Engine._init_fn`` op by op) and as the traced executors do (``Engine._init_jit``), then the
compiled program split into tracing + lowering, XLA compilation and running, with the lines
of its compiled HLO. Every measurement runs in a fresh process.

    python experiments/benchmarks/bench_init.py --models cnn,resnet18,resnet50,googlenet \
        --family HtFE-img-8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def model_init(arch: str, mode: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models import make_model  # pylint: disable=import-outside-toplevel
  shape = (28, 28, 1) if arch == "cnn" else (32, 32, 3)
  model = make_model(arch, shape, 10)
  x = jnp.zeros((1,) + shape)
  seconds = []
  for i in range(2):
    start = time.perf_counter()
    init = model.init if mode == "eager" else jax.jit(model.init)
    jax.block_until_ready(init(jax.random.key(i), x))
    seconds.append(time.perf_counter() - start)
  return {"what": arch, "mode": mode, "first_s": seconds[0], "second_s": seconds[1]}


def family_init(family: str, mode: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from bench_rounds import make_data  # pylint: disable=import-outside-toplevel
  from fedjax_lib.algorithms import make_algorithm  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import rng  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core.local import LocalSpec  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from fedjax_lib.models import make_model, parse_model_names
  names = parse_model_names(family)
  unique = tuple(dict.fromkeys(names))
  data = make_data(20)
  spec = LocalSpec(learning_rate=0.01, batch_size=10, local_epochs=1, steps_per_epoch=10)
  models = {n: make_model(n, (32, 32, 3), 10, feature_dim=512) for n in unique}
  alg = make_algorithm("Local", models[unique[0]], spec)
  groups = [engine_lib.Group(n, dataclasses.replace(alg, model=models[n]),
                             tuple(i for i in range(20) if names[i % len(names)] == n))
            for n in unique]
  eng = engine_lib.Engine(groups, engine_lib.DeviceData.from_federated(data),
                          engine_lib.Participation(20), executor="sequential",
                          model_cycle=[unique.index(n) for n in names])
  args = ({}, rng.root_key(0), data.x[0])
  row = {"what": family, "mode": mode}
  start = time.perf_counter()
  if mode == "split":
    lowered = jax.jit(eng._init_fn).lower(*args)  # pylint: disable=protected-access
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    row.update(lower_s=traced - start, compile_s=done - traced,
               run_s=time.perf_counter() - done,
               compiled_hlo_lines=compiled.as_text().count("\n"))
  else:
    init = eng._init_fn if mode == "eager" else eng._init_jit  # pylint: disable=protected-access
    jax.block_until_ready(init(*args))
  row["first_s"] = time.perf_counter() - start
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="cnn,resnet18", help="comma list of architectures")
  p.add_argument("--family", default="", help="an HtFLlib family, e.g. HtFE-img-8 (optional)")
  p.add_argument("--prng", default="", help="jax_default_prng_impl for --family (e.g. rbg)")
  p.add_argument("--child", nargs=3, metavar=("KIND", "WHAT", "MODE"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    sys.path[:0] = [ROOT, HERE]
    kind, what, mode = args.child
    if args.prng:
      import jax  # pylint: disable=import-outside-toplevel
      jax.config.update("jax_default_prng_impl", args.prng)
    row = model_init(what, mode) if kind == "model" else family_init(what, mode)
    print(json.dumps(row))
    return
  jobs = [("model", m, mode) for m in filter(None, args.models.split(","))
          for mode in ("eager", "jit")]
  if args.family:
    jobs += [("family", args.family, mode) for mode in ("eager", "jit", "split")]
  for kind, what, mode in jobs:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, what, mode]
    if kind == "family" and args.prng:
      cmd += ["--prng", args.prng]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()

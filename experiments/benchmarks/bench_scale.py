"""Scale benchmarks: peak memory at 20–2,000 clients, and sweeps against separate runs.

``memory`` (the scaling curve): the Cifar-100 4-layer CNN (924,708 parameters per model) on CIFAR-100-shaped
synthetic data (3×32×32, 100 classes), ``--samples`` images in all (CIFAR-100's 60,000 by
default) split evenly over N clients (80 % train / 20 % test per client), batch 10, 1 local
epoch, all clients selected and evaluated. Each (N, algorithm, executor) runs in a fresh process:
initialisation, an evaluation, one round (compiling), one timed round and a timed evaluation;
the process reports its peak memory (peak RSS on CPU, ``peak_bytes_in_use`` on an accelerator)
and the bytes of the stacked client states.

``sweep``: FedAvg on the bundled digits (20 clients, Dir(0.1), 4-layer CNN, batch 10) as an
S-way sweep (``--seeds`` × ``--lrs``) in the one run loop, with each of ``--sweep-executors``
(the default executor runs the combinations one after another within each round on CPU; vmap
stacks them in one program), against the same S combinations as separate runs (with each of
``--separate-executors``); every run is a fresh ``python -m fedjax_lib`` process, as a user
starts it, without and with ``--compile-cache`` (``--caches``); seconds per round exclude the
compiling round 0, wall times are whole processes; throughput is relative to the first row.

    python experiments/benchmarks/bench_scale.py memory --clients 20,100,500,2000 \
        --algorithms FedAvg,Ditto,FedTGP --per-client 50 --plot scaling.png
    python experiments/benchmarks/bench_scale.py sweep --seeds 0,1,2 --lrs 0.01,0.005
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402  pylint: disable=wrong-import-position  (experiments/common.py)


def _header() -> str:
  import jax  # pylint: disable=import-outside-toplevel
  return (f"Measured {datetime.date.today().isoformat()} on {platform.machine()} "
          f"({os.cpu_count()} cores), backend {jax.default_backend()} "
          f"({jax.devices()[0].device_kind}), jax {jax.__version__}.")


# ----------------------------------------------------------------------------- memory
def memory_single(num_clients: int, algorithm: str, executor: str, samples: int,
                  per_client: int, images: str = "float32", chunk_size: int = 8) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bench_rounds import peak_memory_bytes  # pylint: disable=import-outside-toplevel
  from fedjax_lib.algorithms import make_algorithm  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import rng  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core.local import LocalSpec  # pylint: disable=import-outside-toplevel
  from fedjax_lib.data import sources  # pylint: disable=import-outside-toplevel
  from fedjax_lib.data.federated import FederatedData  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models import count_params, make_model  # pylint: disable=import-outside-toplevel

  per = per_client or samples // num_clients
  train = int(0.8 * per)
  x, y = sources.synthetic(num_clients * per, (32, 32, 3), 100, seed=0)
  if images == "uint8":  # as the CLI holds tfds image sets: uint8, scaled to [-1, 1] per batch
    from fedjax_lib.data.quantized import QuantizedImages  # pylint: disable=import-outside-toplevel
    x = QuantizedImages(np.clip(np.rint((x / 3 + 1) * 127.5), 0, 255).astype(np.uint8))
  pools = np.arange(num_clients * per).reshape(num_clients, per)
  data = FederatedData.from_client_indices("synthetic-cifar100", x, y, list(pools[:, :train]),
                                           list(pools[:, train:]), 100)
  del x, y
  model = make_model("cnn", data.sample_shape, 100)
  steps = train // 10
  backend = jax.default_backend()
  spec = LocalSpec(learning_rate=0.005, batch_size=10, local_epochs=1, steps_per_epoch=steps,
                   unroll=engine_lib.default_unroll(backend, steps),
                   loop=engine_lib.default_local_loop(backend))
  algo = make_algorithm(algorithm, model, spec)
  eng = engine_lib.Engine(algo, engine_lib.DeviceData.from_federated(data),
                          engine_lib.Participation(num_clients), executor=executor,
                          chunk_size=chunk_size)
  root = rng.root_key(0)
  t0 = time.perf_counter()
  s, c = eng.init(root, data.x[0])
  eng.evaluate(s, c, root, 0)
  s, c, _ = eng.run_round(s, c, root, 0)
  jax.block_until_ready((s, c))
  first = time.perf_counter() - t0
  t = time.perf_counter()
  s, c, _ = eng.run_round(s, c, root, 1)
  jax.block_until_ready((s, c))
  train_s = time.perf_counter() - t
  t = time.perf_counter()
  metrics = eng.evaluate(s, c, root, 2)
  eval_s = time.perf_counter() - t
  kind, peak = peak_memory_bytes()
  state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(c))
  return {"clients": num_clients, "algorithm": algorithm, "executor": executor,
          "chunk_size": chunk_size if executor == "chunked" else None, "images": images,
          "samples_per_client": per, "params_per_model": count_params(algo.init_params(
              rng.root_key(0), data.x[0])),
          "backend": backend, "first_s": first, "train_s": train_s, "eval_s": eval_s,
          "memory_kind": kind, "peak_memory_bytes": peak, "client_state_bytes": state_bytes,
          "data_bytes": int(data.x.nbytes), "test_acc": metrics["test_acc"]}


def _subprocess(args: list[str], timeout: float) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__)] + args
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  for line in out.stdout.splitlines()[::-1]:
    if line.startswith("{"):
      return json.loads(line)
  err = out.stderr.strip().splitlines() or [f"exit status {out.returncode}, no output"]
  if out.returncode < 0:
    err = [f"killed by signal {-out.returncode} (out of memory?)"]
  return {"error": err[-1][:200]}


def scaling_plot(rows: list[dict], path: str, title: str) -> None:
  """Log-log seconds per round (training + evaluation) and peak memory against clients."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
  for name in dict.fromkeys(f"{r['algorithm']} ({r['executor']})" for r in rows):
    ok = [r for r in rows if "error" not in r and f"{r['algorithm']} ({r['executor']})" == name]
    if not ok:
      continue
    n = [r["clients"] for r in ok]
    left.plot(n, [r["train_s"] + r["eval_s"] for r in ok], "o-", label=name)
    right.plot(n, [r["peak_memory_bytes"] / 1e9 for r in ok], "o-", label=name)
  for ax, what in ((left, "seconds per round (train + eval)"), (right, "peak memory (GB)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients")
    ax.set_ylabel(what)
    ax.grid(True, which="both", alpha=0.3)
  left.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def memory_table(rows: list[dict]) -> str:
  lines = ["| clients | samples/client | algorithm | executor | images | client states (GB) | "
           "peak memory (GB) | train s/round | eval s/round | first round incl. compile (s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['clients']} | | {r['algorithm']} | {r['executor']} | "
                   f"{r.get('images', '')} | | {r['error']} | | | |")
      continue
    lines.append(f"| {r['clients']} | {r['samples_per_client']} | {r['algorithm']} | "
                 f"{r['executor']} | {r.get('images', 'float32')} | "
                 f"{r['client_state_bytes'] / 1e9:.2f} | "
                 f"{r['peak_memory_bytes'] / 1e9:.2f} | {r['train_s']:.2f} | {r['eval_s']:.2f} | "
                 f"{r['first_s']:.1f} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- sweep
def _cli_run(args: list[str], out: str, timeout: float) -> tuple[float, float]:
  """One ``python -m fedjax_lib`` process, as a user starts it: (wall seconds of the whole
  process, seconds per round of its runs together: a sweep's summary, or the sum over its
  runs' results files)."""
  wall = common.run_cli([*args, "--out", out, "--no-progress", "--no-plot", "-q"],
                        " ".join(["python -m fedjax_lib", *args]), timeout)
  names = [n for n in os.listdir(out) if n.endswith(".json") and "_partition" not in n]
  summary = [n for n in names if n.endswith("_sweep_summary.json")]
  per_round = 0.0
  for name in summary or names:  # a sweep's summary: its combinations' rounds together
    with open(os.path.join(out, name), encoding="utf-8") as f:
      per_round += json.load(f)["mean_round_time_s"]
  return wall, per_round


def sweep_bench(seeds: list[int], lrs: list[float], rounds: int, algorithm: str,
                sweep_executors: list[str], separate_executors: list[str],
                separate_runs: int = 0, caches: tuple[str, ...] = ("off", "fresh"),
                timeout: float = 3600, cli_args: tuple[str, ...] = ()) -> str:
  """The sweep's rows, then separate runs of its first ``separate_runs`` combinations (0: all
  S) per executor, every run a fresh ``python -m fedjax_lib`` process (what a user starts),
  once per ``caches`` setting: ``off`` (no compile cache) and ``fresh`` (``--compile-cache``
  in a folder of its own, empty before the row's first process: the S separate runs share it,
  so the first compiles and the others load). "per combination" divides each row's s/round by
  the combinations it ran; the wall time is the processes' from start to exit. ``cli_args``
  go to every process (e.g. ``--dtype bfloat16``)."""
  import jax  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import engine as engine_lib  # pylint: disable=import-outside-toplevel
  base = ["-algo", algorithm, "-gr", str(rounds), "--partition-seed", "0", *cli_args]
  size = len(seeds) * len(lrs)
  default = engine_lib.default_executor(jax.default_backend())
  resolve = lambda e: default if e == "auto" else e
  how = {"sequential": "runs one after another within each round",
         "vmap": "runs stacked in one program", "chunked": "runs stacked in one program"}
  combos = [(seed, lr) for seed in seeds for lr in lrs][:separate_runs or None]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for cache in caches:
      for executor in dict.fromkeys(map(resolve, sweep_executors)):
        flags = [] if cache == "off" else [
            "--compile-cache", os.path.join(tmp, f"cache-sweep-{executor}")]
        wall, per_round = _cli_run(
            base + ["--executor", executor, "--sweep", "seed=" + ",".join(map(str, seeds)),
                    "lr=" + ",".join(map(str, lrs))] + flags,
            os.path.join(tmp, f"sweep-{executor}-{cache}"), timeout)
        rows.append((f"one sweep process, {executor} executor ({how[executor]}), compile "
                     f"cache {cache}", per_round, wall, size))
      for executor in dict.fromkeys(map(resolve, separate_executors)):
        flags = [] if cache == "off" else [
            "--compile-cache", os.path.join(tmp, f"cache-separate-{executor}")]
        per_round, wall = 0.0, 0.0
        for seed, lr in combos:
          w, r = _cli_run(base + ["--executor", executor, "--seed", str(seed), "-lr", str(lr)]
                          + flags, os.path.join(tmp, f"separate-{executor}-{cache}-{seed}-{lr}"),
                          timeout)
          wall, per_round = wall + w, per_round + r
        rows.append((f"{len(combos)} separate process{'es' * (len(combos) > 1)}, {executor} "
                     f"executor, compile cache {cache}", per_round, wall, len(combos)))
  lines = [f"{algorithm} on digits (20 clients, Dir(0.1), 4-layer CNN, lr ∈ {lrs}, seeds "
           f"{seeds}: S = {size} combinations), {rounds} rounds, evaluation every round"
           + (f", `{' '.join(cli_args)}`" if cli_args else "") + "; each "
           "row's runs are fresh `python -m fedjax_lib` processes. " + _header(), "",
           "| how | s/round for the combinations it ran | s/round per combination | throughput × "
           "first row | wall time of its processes (s) |", "|---|---|---|---|---|"]
  first = rows[0][1] / rows[0][3]
  for name, per_round, wall, count in rows:
    lines.append(f"| {name} | {per_round:.3f} | {per_round / count:.3f} | "
                 f"{first / (per_round / count):.2f} | {wall:.1f} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="mode", required=True)
  m = sub.add_parser("memory")
  m.add_argument("--clients", default="20,100,500,2000")
  m.add_argument("--algorithms", default="FedAvg,Ditto")
  m.add_argument("--executors", default="auto")
  m.add_argument("--samples", type=int, default=60000)
  m.add_argument("--per-client", type=int, default=0,
                 help="samples per client (overrides --samples: N × per-client in all)")
  m.add_argument("--timeout", type=float, default=1800)
  m.add_argument("--images", default="float32",
                 help="how the images are held, a comma list of float32, uint8 (uint8: as the "
                 "CLI holds tfds image sets)")
  m.add_argument("--chunk-size", type=int, default=8, help="the chunked executor's chunk")
  m.add_argument("--plot", help="also write a log-log PNG of s/round and peak memory here")
  m.add_argument("--json", help="also write the rows here")
  m.add_argument("--single", nargs=3, metavar=("CLIENTS", "ALGORITHM", "EXECUTOR"),
                 help=argparse.SUPPRESS)
  s = sub.add_parser("sweep")
  s.add_argument("--seeds", default="0,1,2")
  s.add_argument("--lrs", default="0.01,0.005")
  s.add_argument("--rounds", type=int, default=5)
  s.add_argument("--algorithm", default="FedAvg")
  s.add_argument("--sweep-executors", default="auto,vmap",
                 help="executors the sweep runs with (auto = the backend's default)")
  s.add_argument("--separate-executors", default="auto",
                 help="executors of the S separate runs it is compared with")
  s.add_argument("--separate-runs", type=int, default=0,
                 help="run only the first N combinations separately (0: all S); e.g. 1 for the "
                 "sweep's cost against one run")
  s.add_argument("--cli-args", default="",
                 help="more flags for every python -m fedjax_lib process, one string")
  s.add_argument("--caches", default="off,fresh",
                 help="compile-cache settings, each a set of rows: off, fresh (an empty folder)")
  args = p.parse_args()
  if args.mode == "sweep":
    print(sweep_bench([int(v) for v in args.seeds.split(",")],
                      [float(v) for v in args.lrs.split(",")], args.rounds, args.algorithm,
                      args.sweep_executors.split(","), args.separate_executors.split(","),
                      args.separate_runs, tuple(args.caches.split(",")),
                      cli_args=tuple(args.cli_args.split())))
    return
  if args.single:
    n, algo, executor = args.single
    print(json.dumps(memory_single(int(n), algo, executor, args.samples, args.per_client,
                                   args.images, args.chunk_size)))
    return
  import jax  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import engine as engine_lib  # pylint: disable=import-outside-toplevel
  rows = []
  for n in args.clients.split(","):
    for algo in args.algorithms.split(","):
      for executor in args.executors.split(","):
        if executor == "auto":
          executor = engine_lib.default_executor(jax.default_backend())
        for images in args.images.split(","):
          row = _subprocess(["memory", "--samples", str(args.samples), "--per-client",
                             str(args.per_client), "--images", images, "--chunk-size",
                             str(args.chunk_size), "--single", n, algo, executor], args.timeout)
          row.setdefault("clients", int(n))
          row.setdefault("algorithm", algo)
          row.setdefault("executor", executor)
          row.setdefault("images", images)
          rows.append(row)
          print(json.dumps(row), file=sys.stderr, flush=True)
  amount = (f"{args.per_client} CIFAR-100-shaped synthetic images per client" if args.per_client
            else f"{args.samples} CIFAR-100-shaped synthetic images split evenly")
  amount += f" (chunks of {args.chunk_size} for the chunked executor)"
  print(f"Cifar-100 4-layer CNN (924,708 parameters), {amount} (80 % train), batch 10, 1 local "
        "epoch. " + _header() + "\n")
  print(memory_table(rows))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f)
  if args.plot:
    scaling_plot(rows, args.plot, f"Cifar-100 CNN, {amount}; {_header()}")


if __name__ == "__main__":
  main()

"""Seconds per round (training and evaluation separately) and peak memory of FedAvg.

Workload (the foundation issue's): FedAvg with the 4-layer FedAvgCNN (878,538 parameters) on
CIFAR-shaped synthetic data (3×32×32, 10 classes), every client holding 100 training and 25 test
samples, batch 10, 1 local epoch (10 local steps per client), all clients selected, every client
evaluated every round. For each client count and executor, a fresh process runs one warm-up
round (compilation) and ``--rounds`` timed rounds, and reports its peak memory: the process's
peak RSS on CPU, the device's ``peak_bytes_in_use`` on an accelerator.

Optionally (``--torch``) the same workload runs through ``torch_baseline.py``: a PyTorch
re-creation of PFLlib's execution model (one client after another, a model copy per client,
per-client DataLoaders) in the same script run, so the ratio is measured side by side;
``--torch-python`` names a Python with torch (it needs neither JAX nor this library: the
baseline's client files are written by this script's Python).

    python experiments/benchmarks/bench_rounds.py --clients 20,100,500 --torch \
        --write experiments/benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TRAIN_PER_CLIENT, TEST_PER_CLIENT = 100, 25


def make_data(num_clients: int, seed: int = 0):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from fedjax_lib.data import sources  # pylint: disable=import-outside-toplevel
  from fedjax_lib.data.federated import FederatedData  # pylint: disable=import-outside-toplevel
  per = TRAIN_PER_CLIENT + TEST_PER_CLIENT
  x, y = sources.synthetic(num_clients * per, (32, 32, 3), 10, seed=seed)
  pools = np.arange(num_clients * per).reshape(num_clients, per)
  return FederatedData.from_client_indices(
      "synthetic-cifar", x, y, list(pools[:, :TRAIN_PER_CLIENT]),
      list(pools[:, TRAIN_PER_CLIENT:]), 10)


def peak_memory_bytes() -> tuple[str, int]:
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    return "device peak_bytes_in_use", int(stats.get("peak_bytes_in_use", 0))
  return "process peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_single(num_clients: int, executor: str, rounds: int, chunk_size: int,
               unroll: int | None, conv_impl: str, dtype: str = "float32",
               threads: int | None = None) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from fedjax_lib.algorithms import make_algorithm  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import rng  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core.local import LocalSpec  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models import make_model  # pylint: disable=import-outside-toplevel

  data = make_data(num_clients)
  model = make_model("cnn", data.sample_shape, 10, dtype=dtype, conv_impl=conv_impl)
  steps = TRAIN_PER_CLIENT // 10
  backend = jax.default_backend()
  unroll = engine_lib.default_unroll(backend, steps) if unroll is None else unroll
  loop = engine_lib.default_local_loop(backend)
  spec = LocalSpec(learning_rate=0.005, batch_size=10, local_epochs=1, steps_per_epoch=steps,
                   unroll=unroll, loop=loop)
  eng = engine_lib.Engine(make_algorithm("FedAvg", model, spec),
                          engine_lib.DeviceData.from_federated(data),
                          engine_lib.Participation(num_clients), executor=executor,
                          chunk_size=chunk_size, client_threads=threads)
  root = rng.root_key(0)
  t0 = time.perf_counter()
  s, c = eng.init(root, data.x[0])
  s, c, _ = eng.run_round(s, c, root, 0)
  jax.block_until_ready(s)
  metrics = eng.evaluate(s, c)
  first = time.perf_counter() - t0
  train, evals = [], []
  for r in range(1, rounds + 1):
    t = time.perf_counter()
    s, c, _ = eng.run_round(s, c, root, r)
    jax.block_until_ready(s)
    train.append(time.perf_counter() - t)
    t = time.perf_counter()
    metrics = eng.evaluate(s, c)
    evals.append(time.perf_counter() - t)
  kind, peak = peak_memory_bytes()
  return {"clients": num_clients, "executor": executor, "conv_impl": conv_impl, "dtype": dtype,
          "unroll": unroll, "loop": loop, "chunk_size": chunk_size if executor == "chunked" else None,
          "client_threads": eng.client_threads if executor == "sequential" else None,
          "backend": backend, "device": str(jax.devices()[0].device_kind),
          "first_round_s": first, "train_s": min(train), "eval_s": min(evals),
          "train_s_all": train, "eval_s_all": evals, "memory_kind": kind,
          "peak_memory_bytes": peak, "test_acc": metrics["test_acc"]}


def _subprocess(args: list[str], timeout: float) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return _json_row([sys.executable, os.path.abspath(__file__)] + args, timeout, env)


def _json_row(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
  """The last JSON line ``cmd`` prints, or ``{"error": ...}`` with its last stderr line."""
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                         check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  for line in out.stdout.splitlines()[::-1]:
    if line.startswith("{"):
      return json.loads(line)
  return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def _fmt(row: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
  value = row.get(key)
  return "—" if value is None else f"{value * scale:.{digits}f}"


def table(rows: list[dict]) -> str:
  lines = ["| clients | implementation | train s/round | eval s/round | total s/round | "
           "speed-up vs PyTorch sequential | peak memory (GB) | first round incl. compile (s) |",
           "|---|---|---|---|---|---|---|---|"]
  torch_total = {r["clients"]: r["train_s"] + r["eval_s"] for r in rows
                 if r.get("executor") == "torch-sequential" and "error" not in r}
  for r in rows:
    name = r["executor"] if r["executor"] == "torch-sequential" else (
        f"fedjax {r['executor']}" + (f" (chunk {r['chunk_size']})" if r.get("chunk_size") else "")
        + (f", {r['conv_impl']} conv" if r.get("conv_impl", "lax") != "lax" else "")
        + (f", {r['dtype']}" if r.get("dtype", "float32") != "float32" else "")
        + (f", {r['loop']} loop" if r.get("loop") else "")
        + (f", {r['client_threads']} client thread{'s' if r['client_threads'] > 1 else ''}"
           if r.get("client_threads") else "")
        + (f", unroll {r.get('unroll')}" if r.get("loop") != "valid" else ""))
    if "error" in r:
      lines.append(f"| {r['clients']} | {name} | {r['error']} | | | | | |")
      continue
    total = r["train_s"] + r["eval_s"]
    ratio = (f"{torch_total[r['clients']] / total:.1f}x" if r["clients"] in torch_total
             and r["executor"] != "torch-sequential" else "—")
    lines.append(f"| {r['clients']} | {name} | {r['train_s']:.3f} | {r['eval_s']:.3f} | "
                 f"{total:.3f} | {ratio} | {_fmt(r, 'peak_memory_bytes', 1e-9, 2)} | "
                 f"{_fmt(r, 'first_round_s', 1, 1)} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--clients", default="20,100,500")
  p.add_argument("--executors", default="vmap,sequential,chunked")
  p.add_argument("--conv-impls", default="auto",
                 help="comma list of auto,lax,patches,slices,hybrid (auto: the backend's)")
  p.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up")
  p.add_argument("--chunk-size", default="8",
                 help="the chunked executor's chunk size; a comma list gives a row per size")
  p.add_argument("--dtypes", default="float32",
                 help="comma list of computation dtypes: float32, bfloat16 (mixed precision)")
  p.add_argument("--unroll", type=int, default=None)
  p.add_argument("--client-threads", default="",
                 help="the sequential executor's client threads; a comma list gives a row per "
                 "count (default: the backend's)")
  p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
  p.add_argument("--torch", action="store_true", help="also time the PyTorch baseline")
  p.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
  p.add_argument("--torch-device", default="cpu", help="torch device for the baseline")
  p.add_argument("--torch-python", default=sys.executable,
                 help="the Python (with torch; JAX not needed) that runs the baseline")
  p.add_argument("--write", default=None, help="append the table to this markdown file")
  p.add_argument("--title", default=None)
  p.add_argument("--single", nargs=2, metavar=("CLIENTS", "EXECUTOR"), help=argparse.SUPPRESS)
  p.add_argument("--conv-impl", default="auto", help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.single:
    print(json.dumps(run_single(int(args.single[0]), args.single[1], args.rounds,
                                int(args.chunk_size), args.unroll, args.conv_impl,
                                args.dtype, args.threads)))
    return
  rows = []
  for n in [int(v) for v in args.clients.split(",")]:
    if args.torch:
      cmd = [args.torch_python, os.path.join(HERE, "torch_baseline.py"), "--clients", str(n),
             "--rounds", str(args.rounds), "--threads", str(args.torch_threads),
             "--device", args.torch_device, "--data-python", sys.executable]
      row = _json_row(cmd, args.timeout)
      row.update(clients=n, executor="torch-sequential")
      rows.append(row)
      print(json.dumps(row), flush=True)
    threads = args.client_threads.split(",") if args.client_threads else [""]
    configs = [(impl, dtype, ex, chunk, t) for dtype in args.dtypes.split(",")
               for impl in args.conv_impls.split(",") for ex in args.executors.split(",")
               for chunk in (args.chunk_size.split(",") if ex == "chunked"
                             else args.chunk_size.split(",")[:1])
               for t in (threads if ex == "sequential" else [""])]
    for impl, dtype, ex, chunk, t in configs:
      extra = ["--rounds", str(args.rounds), "--chunk-size", chunk, "--conv-impl", impl,
               "--dtype", dtype] + (["--threads", t] if t else [])
      if args.unroll is not None:
        extra += ["--unroll", str(args.unroll)]
      row = _subprocess(["--single", str(n), ex] + extra, args.timeout)
      row.update(clients=n, executor=ex, conv_impl=impl, dtype=dtype)
      if ex == "chunked":
        row.setdefault("chunk_size", int(chunk))
      rows.append(row)
      print(json.dumps(row), flush=True)
  import jax  # pylint: disable=import-outside-toplevel
  header = (f"### {args.title or 'FedAvg round time'} — {datetime.date.today().isoformat()}\n\n"
            f"Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
            f"cores; JAX device: {jax.devices()[0].device_kind} ({jax.default_backend()}); "
            f"JAX {jax.__version__}, Python {platform.python_version()}.\n"
            f"Workload: FedAvg, FedAvgCNN, 3×32×32 synthetic, {TRAIN_PER_CLIENT} train + "
            f"{TEST_PER_CLIENT} test samples per client, batch 10, 1 epoch, all clients "
            f"selected and evaluated; best of {args.rounds} timed rounds after a warm-up round.\n"
            f"Command: `python experiments/benchmarks/bench_rounds.py {' '.join(sys.argv[1:])}`"
            "\n\n")
  text = header + table(rows) + "\n"
  print(text)
  if args.write:
    with open(args.write, "a") as f:
      f.write("\n" + text)


if __name__ == "__main__":
  main()

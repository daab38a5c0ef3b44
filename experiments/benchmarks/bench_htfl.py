"""Seconds per round and peak memory of heterogeneous FL (HtFLlib's HtFE-img-8 family).

Workload: HtFLlib's model family HtFE-img-8 — FedAvgCNN, GoogLeNet, MobileNetV2, ResNet18,
ResNet34, ResNet50, ResNet101, ResNet152 (client i uses architecture i mod 8), every base's
output adaptively average-pooled to 512 features and a ``Linear(512, 10)`` head — on 20
clients of CIFAR-shaped synthetic data (``bench_rounds.make_data``: 100 train + 25 test
samples per client, 3×32×32, 10 classes), batch 10, 1 local epoch (10 SGD steps per client,
lr 0.01), all clients selected every round, every client evaluated every round (test accuracy
and AUC, and the training loss over its training samples). Algorithm ``Local`` (every client
trains its own model; BatchNorm in training mode with running statistics per client, dropout in
the GoogLeNet and MobileNetV2 bases); ``--algos Local,FedTGP`` adds FedTGP on the JAX side.

Each measurement runs in its own process: the JAX engine (``--impl jax``), and
``torch_htfl.py``, a PyTorch re-creation of HtFLlib's sequential execution of Local
(``--impl torch``). A round is: evaluate every client, then train every client (HtFLlib's
order). The first round (initialisation and compilation included) is reported separately;
``--rounds`` timed rounds follow, and the table shows their mean. Peak memory is the device's
``peak_bytes_in_use`` (JAX) or ``torch.cuda.max_memory_allocated()`` (PyTorch) on a GPU, the
process's peak RSS on the CPU.

Progress lines are printed as they come (run with ``PYTHONUNBUFFERED=1`` under a pipe); every
process rewrites its result file after each round and ``--json`` is rewritten after each
measurement, so a run cut short keeps what it measured. This script never initialises a JAX
backend itself (on a GPU the measuring child has the device to itself).

    # GPU, both implementations:
    PYTHONPATH=. python experiments/benchmarks/bench_htfl.py --impl jax,torch --rounds 3
    # quick check on a small family:
    PYTHONPATH=. python experiments/benchmarks/bench_htfl.py --family cnn,resnet18 --rounds 1 \\
        --torch-python /tmp/torchenv/bin/python
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if HERE not in sys.path:
  sys.path.insert(0, HERE)

NUM_CLIENTS = 20
BATCH_SIZE = 10
LEARNING_RATE = 0.01
FEATURE_DIM = 512
NUM_CLASSES = 10
SAMPLE_SHAPE = (32, 32, 3)


def _write_json(path: str | None, obj) -> None:
  """Writes ``obj`` to ``path`` atomically (a reader never sees half a file)."""
  if not path:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _log(msg: str) -> None:
  print(msg, flush=True)


def algorithm_params(algo: str) -> dict:
  """HtFLlib's total.sh hyperparameters of ``algo`` (those of experiments/htfl_digits); FedKTL
  gets an untrained built-in VAE (the same cost as a trained one), FedL2G no warm-up rounds
  (the timed rounds train)."""
  sys.path.insert(0, os.path.dirname(HERE))
  import common  # pylint: disable=import-outside-toplevel  (experiments/common.py)
  from htfl_digits import run as htfl  # pylint: disable=import-outside-toplevel
  params = dict(htfl.HYPERPARAMETERS.get(algo, ({}, ""))[0])
  if algo == "FedKTL":
    params["generator_path"] = common.ensure_generator(
        "random", os.path.join(tempfile.gettempdir(), "fedjax_bench_generators"), 0)
  if algo.startswith("FedL2G"):
    params["warmup_rounds"] = 0
  return params


# ---------------------------------------------------------------------------- the JAX child
def run_jax(family: str, algo: str, rounds: int, executor: str | None, unroll: int | None,
            chunk_size: int, out: str | None) -> dict:
  """One JAX measurement: build the groups, a first round, ``rounds`` timed rounds."""
  t_start = time.perf_counter()
  import jax  # pylint: disable=import-outside-toplevel
  from bench_rounds import TRAIN_PER_CLIENT, make_data  # pylint: disable=import-outside-toplevel
  from fedjax_lib import memory  # pylint: disable=import-outside-toplevel
  from fedjax_lib.algorithms import make_algorithm  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import rng  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core.local import LocalSpec  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from fedjax_lib.models import count_params, init_model, make_model, parse_model_names

  backend = jax.default_backend()
  device = jax.devices()[0]
  names = parse_model_names(family)
  unique = tuple(dict.fromkeys(names))
  data = make_data(NUM_CLIENTS)
  steps = TRAIN_PER_CLIENT // BATCH_SIZE
  unroll = engine_lib.default_unroll(backend, steps) if unroll is None else unroll
  executor = executor or engine_lib.default_executor(backend)
  spec = LocalSpec(learning_rate=LEARNING_RATE, batch_size=BATCH_SIZE, local_epochs=1,
                   steps_per_epoch=steps, unroll=unroll,
                   loop=engine_lib.default_local_loop(backend))
  models = {n: make_model(n, SAMPLE_SHAPE, NUM_CLASSES, feature_dim=FEATURE_DIM) for n in unique}
  params = {n: count_params(jax.eval_shape(
      lambda m=m: init_model(m, jax.random.PRNGKey(0), SAMPLE_SHAPE))) for n, m in models.items()}
  alg = make_algorithm(algo, models[unique[0]], spec, algorithm_params(algo))
  groups = [engine_lib.Group(n, dataclasses.replace(alg, model=models[n]),
                             tuple(i for i in range(NUM_CLIENTS) if names[i % len(names)] == n))
            for n in unique]
  groups = [g for g in groups if g.ids]
  eng = engine_lib.Engine(groups, engine_lib.DeviceData.from_federated(data),
                          engine_lib.Participation(NUM_CLIENTS), executor=executor,
                          chunk_size=chunk_size,
                          model_cycle=[unique.index(n) for n in names])
  versions = {"jax": jax.__version__, "python": platform.python_version()}
  for mod in ("jaxlib", "flax", "optax"):
    try:
      versions[mod] = __import__(mod).__version__
    except Exception:  # pylint: disable=broad-except
      pass
  row = {"impl": "jax", "algo": algo, "family": family, "architectures": list(names),
         "executor": executor, "unroll": unroll, "loop": spec.loop,
         "chunk_size": chunk_size if executor == "chunked" else None,
         "backend": backend, "device": str(device.device_kind), "versions": versions,
         "params": params, "complete": False, "train_s_all": [], "eval_s_all": []}

  def peak():
    if device.platform != "cpu":
      stats = device.memory_stats() or {}
      return "device peak_bytes_in_use", int(stats.get("peak_bytes_in_use", 0))
    return "process peak RSS", memory.peak_rss_bytes()

  def save(**kw):
    row.update(kw)
    row["memory_kind"], row["peak_memory_bytes"] = peak()
    _write_json(out, row)

  root = rng.root_key(0)
  setup = time.perf_counter() - t_start
  _log(f"[jax {algo}] {backend} {device.device_kind}, executor {executor}, unroll {unroll}, "
       f"groups {[(g.name, g.size) for g in groups]}; setup {setup:.1f} s")
  t0 = time.perf_counter()
  server, clients = eng.init(root, data.x[0])
  jax.block_until_ready((server, clients))
  t_init = time.perf_counter() - t0
  _log(f"[jax {algo}] init {t_init:.1f} s")
  save(setup_s=setup, init_s=t_init)
  t1 = time.perf_counter()
  metrics = eng.evaluate(server, clients, root, 0)
  t2 = time.perf_counter()
  _log(f"[jax {algo}] first evaluation (compiles) {t2 - t1:.1f} s")
  save(first_eval_s=t2 - t1)
  server, clients, _ = eng.run_round(server, clients, root, 0)
  jax.block_until_ready((server, clients))
  t3 = time.perf_counter()
  first = t3 - t0
  _log(f"[jax {algo}] first training round (compiles) {t3 - t2:.1f} s; first round incl. init "
       f"{first:.1f} s; test_acc {metrics['test_acc']:.3f}")
  save(first_train_s=t3 - t2, first_round_s=first)
  for r in range(1, rounds + 1):
    t = time.perf_counter()
    metrics = eng.evaluate(server, clients, root, r)
    ev = time.perf_counter() - t
    t = time.perf_counter()
    server, clients, _ = eng.run_round(server, clients, root, r)
    jax.block_until_ready((server, clients))
    tr = time.perf_counter() - t
    row["eval_s_all"].append(ev)
    row["train_s_all"].append(tr)
    _log(f"[jax {algo}] round {r}: eval {ev:.2f} s, train {tr:.2f} s, test_acc "
         f"{metrics['test_acc']:.3f}, train_loss {metrics['train_loss']:.3f}")
    save(train_s=sum(row["train_s_all"]) / r, eval_s=sum(row["eval_s_all"]) / r,
         test_acc=float(metrics["test_acc"]), train_loss=float(metrics["train_loss"]),
         timed_rounds=r)
  save(complete=True, trace_counts=dict(eng.trace_counts))
  return row


# ---------------------------------------------------------------------------- the parent
def _read_row(out: str, base: dict) -> dict:
  row = dict(base)
  try:
    with open(out) as f:
      row.update(json.load(f))
  except (OSError, ValueError):
    pass
  return row


def _run_child(cmd: list[str], out: str, timeout: float, base: dict, publish) -> dict:
  """Runs a measuring process (its output goes straight to ours) and reads its result file,
  passing the partial row to ``publish`` every few seconds while it runs."""
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  _log("$ " + " ".join(cmd))
  t = time.perf_counter()
  error = None
  proc = subprocess.Popen(cmd, env=env)  # pylint: disable=consider-using-with
  try:
    while True:
      left = timeout - (time.perf_counter() - t)
      if left <= 0:
        raise subprocess.TimeoutExpired(cmd, timeout)
      try:
        code = proc.wait(timeout=min(5.0, left))
        break
      except subprocess.TimeoutExpired:
        publish(dict(_read_row(out, base), error="running", wall_s=time.perf_counter() - t))
    if code != 0:
      error = f"exit status {code}"
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    error = f"timed out after {timeout:.0f} s"
  except BaseException:
    proc.kill()
    proc.wait()
    raise
  row = _read_row(out, base)
  row["wall_s"] = time.perf_counter() - t
  if error and not row.get("complete"):
    row["error"] = error
  return row


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
  return "—" if value is None else f"{value * scale:.{digits}f}"


def _name(r: dict) -> str:
  if r["impl"] == "torch":
    return f"PyTorch sequential ({r.get('device', '?')})"
  text = f"fedjax {r.get('executor', '?')}"
  if r.get("chunk_size"):
    text += f" (chunk {r['chunk_size']})"
  if r.get("loop") == "valid":
    return text + ", valid loop"
  return text + f", unroll {r.get('unroll', '?')}"


def table(rows: list[dict]) -> str:
  lines = ["| implementation | algorithm | train s/round | eval s/round | total s/round | "
           "speed-up vs PyTorch | peak memory (GB) | first round incl. init + compile (s) | "
           "timed rounds | test acc (last eval) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  torch_total = {r["algo"]: r["train_s"] + r["eval_s"] for r in rows
                 if r["impl"] == "torch" and r.get("train_s") is not None}
  for r in rows:
    total = (r["train_s"] + r["eval_s"]) if r.get("train_s") is not None else None
    ratio = (f"{torch_total[r['algo']] / total:.1f}x" if total and r["impl"] != "torch"
             and r["algo"] in torch_total else "—")
    note = f" ({r['error']})" if r.get("error") else ""
    mem = _fmt(r.get("peak_memory_bytes"), 1e-9, 2)
    if r.get("memory_kind"):
      mem += f" ({r['memory_kind']})"
    lines.append(
        f"| {_name(r)}{note} | {r['algo']} | {_fmt(r.get('train_s'), 1, 3)} | "
        f"{_fmt(r.get('eval_s'), 1, 3)} | {_fmt(total, 1, 3)} | {ratio} | {mem} | "
        f"{_fmt(r.get('first_round_s'), 1, 1)} | {r.get('timed_rounds', 0)} | "
        f"{_fmt(r.get('test_acc'), 1, 3)} |")
  return "\n".join(lines)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _header(args, rows: list[dict], title: str) -> str:
  jax_row = next((r for r in rows if r["impl"] == "jax" and r.get("versions")), {})
  torch_row = next((r for r in rows if r["impl"] == "torch" and r.get("versions")), {})
  parts = [f"Python {platform.python_version()}"]
  if jax_row:
    v = jax_row["versions"]
    parts.append(f"JAX {v.get('jax')} (jaxlib {v.get('jaxlib')}, flax {v.get('flax')}, "
                 f"optax {v.get('optax')}) on {jax_row.get('device')} ({jax_row.get('backend')})")
  if torch_row:
    v = torch_row["versions"]
    parts.append(f"PyTorch {v.get('torch')} / torchvision {v.get('torchvision')} on "
                 f"{torch_row.get('device_name', torch_row.get('device'))}, "
                 f"{torch_row.get('threads')} threads")
  archs = (jax_row or torch_row or {}).get("architectures")
  params = (jax_row or torch_row or {}).get("params") or {}
  arch_text = ", ".join(f"{a} ({params[a] / 1e6:.2f}M)" if a in params else a
                        for a in dict.fromkeys(archs or [])) or args.family
  return (
      f"### {title} — {datetime.date.today().isoformat()}\n\n"
      f"Hardware: {_cpu_name()}, {os.cpu_count()} CPU cores; "
      + "; ".join(parts) + ".\n"
      f"Workload: {args.family} ({arch_text}; client i uses architecture i mod "
      f"{len(archs or []) or '?'}), feature dim {FEATURE_DIM}, {NUM_CLIENTS} clients, 3×32×32 "
      f"synthetic data, 100 train + 25 test samples per client, batch {BATCH_SIZE}, 1 local "
      f"epoch (10 SGD steps, lr {LEARNING_RATE}), all clients selected, every client evaluated "
      f"every round (test accuracy and AUC, training loss); mean of the timed rounds after a "
      f"first round that includes initialisation and compilation. PyTorch: HtFLlib's "
      f"sequential Local with data and models kept in memory (a lower bound of HtFLlib's "
      f"time, see torch_htfl.py).\n"
      f"Command: `python experiments/benchmarks/bench_htfl.py {' '.join(sys.argv[1:])}`\n\n")


def _title(args, rows: list[dict]) -> str:
  if args.title:
    return args.title
  jax_row = next((r for r in rows if r["impl"] == "jax" and r.get("device")), None)
  torch_row = next((r for r in rows if r["impl"] == "torch" and r.get("device_name")), None)
  device = (jax_row or {}).get("device") or (
      torch_row and ("cpu" if torch_row.get("device") == "cpu" else torch_row["device_name"])
  ) or "unknown"
  return f"HtFL round time, {args.family}, {device}"


def write_section(path: str, title: str, text: str) -> None:
  """Replaces the section headed ``### {title} — ...`` in ``path``, or appends ``text``."""
  try:
    with open(path) as f:
      lines = f.read().split("\n")
  except FileNotFoundError:
    lines = []
  start = next((i for i, l in enumerate(lines) if l.startswith(f"### {title} — ")), None)
  if start is None:
    body = "\n".join(lines).rstrip("\n")
    with open(path, "w") as f:
      f.write((body + "\n\n" if body else "") + text)
    return
  end = next((i for i in range(start + 1, len(lines))
              if lines[i].startswith("### ") or lines[i].startswith("## ")), len(lines))
  new = lines[:start] + text.rstrip("\n").split("\n") + ([""] if end < len(lines) else []) \
      + lines[end:]
  with open(path, "w") as f:
    f.write("\n".join(new).rstrip("\n") + "\n")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--family", default="HtFE-img-8",
                 help="a model family or a comma list of architectures, e.g. cnn,resnet4")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds after the first round")
  p.add_argument("--impl", default="jax,torch", help="comma list of jax,torch")
  p.add_argument("--algos", default="Local",
                 help="comma list for the JAX side (e.g. Local,FedTGP), or all: the twelve "
                      "HtFLlib algorithms with its total.sh values; PyTorch runs Local only")
  p.add_argument("--executor", default=None,
                 help="vmap|chunked|sequential (default: the engine's default for the backend)")
  p.add_argument("--unroll", type=int, default=None,
                 help="local steps unrolled per loop iteration; 0 = all (default: the "
                      "engine's default, all on CPU, 1 on accelerators)")
  p.add_argument("--chunk-size", type=int, default=8)
  p.add_argument("--timeout", type=float, default=1800,
                 help="seconds per JAX measurement (a cut-short run keeps its finished rounds)")
  p.add_argument("--torch-timeout", type=float, default=None,
                 help="seconds for the PyTorch measurement (default: --timeout)")
  p.add_argument("--torch-python", default=sys.executable,
                 help="python with torch and torchvision for torch_htfl.py")
  p.add_argument("--torch-device", default="auto", help="auto (cuda if available) | cpu | cuda")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch CPU threads, 0 = torch's default (one per core); use 1 on a CPU "
                      "busy with other work, where torch's spinning OpenMP threads ran a "
                      "ResNet18 step ~40x slower")
  p.add_argument("--torch-save-load", action="store_true",
                 help="torch: torch.save/torch.load every client model around each use, as "
                      "HtFLlib does")
  p.add_argument("--json", default=None, help="write all rows here (rewritten as they come)")
  p.add_argument("--write", default=None, help="append (or replace) the section in this "
                                               "markdown file")
  p.add_argument("--title", default=None)
  p.add_argument("--single-jax", default=None, metavar="ALGO", help=argparse.SUPPRESS)
  p.add_argument("--out", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.rounds < 1:
    p.error("--rounds must be >= 1")
  if args.single_jax:
    run_jax(args.family, args.single_jax, args.rounds, args.executor, args.unroll,
            args.chunk_size, args.out)
    return

  impls = [s.strip() for s in args.impl.split(",") if s.strip()]
  algos = [s.strip() for s in args.algos.split(",") if s.strip()]
  if algos == ["all"]:
    sys.path.insert(0, os.path.dirname(HERE))
    from htfl_digits import run as htfl  # pylint: disable=import-outside-toplevel
    algos = list(htfl.ALGORITHMS)
  unknown = set(impls) - {"jax", "torch"}
  if unknown:
    p.error(f"unknown --impl {sorted(unknown)}")
  rows: list[dict] = []
  tmp = tempfile.mkdtemp(prefix="bench_htfl_")

  def publish(running: dict | None = None):
    _write_json(args.json, {"argv": sys.argv[1:],
                            "rows": rows + ([running] if running is not None else [])})

  for impl in impls:
    for algo in (algos if impl == "jax" else ["Local"]):
      out = os.path.join(tmp, f"{impl}_{algo}.json")
      base = {"impl": impl, "algo": algo, "family": args.family}
      if impl == "jax":
        cmd = [sys.executable, os.path.abspath(__file__), "--single-jax", algo, "--family",
               args.family, "--rounds", str(args.rounds), "--chunk-size", str(args.chunk_size),
               "--out", out]
        if args.executor:
          cmd += ["--executor", args.executor]
        if args.unroll is not None:
          cmd += ["--unroll", str(args.unroll)]
        timeout = args.timeout
      else:
        cmd = [args.torch_python, os.path.join(HERE, "torch_htfl.py"), "--family", args.family,
               "--rounds", str(args.rounds), "--device", args.torch_device, "--threads",
               str(args.torch_threads), "--out", out]
        if args.torch_save_load:
          cmd.append("--save-load")
        timeout = args.torch_timeout or args.timeout
      row = _run_child(cmd, out, timeout, base, publish)
      rows.append(row)
      publish()
      _log(f"RESULT {json.dumps(row)}")
      if args.write:  # rewritten after every measurement: a cut-short run keeps its rows
        write_section(args.write, _title(args, rows), _header(args, rows, _title(args, rows))
                      + table(rows) + "\n")
  shutil.rmtree(tmp, ignore_errors=True)
  text = _header(args, rows, _title(args, rows)) + table(rows) + "\n"
  _log("\n" + text)


if __name__ == "__main__":
  main()

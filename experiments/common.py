"""What the experiment scripts share: running one configuration in a fresh process, mean/std
over seeds, table cells, the machine's description, and replacing a marked section of a
Markdown file (the README's tables, an experiment's RESULTS.md)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, what: str) -> dict:
  """Runs ``code`` in a fresh interpreter at the repository root; returns the JSON object its
  last stdout line holds, with ``wall_s`` added."""
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       check=False)
  if out.returncode != 0:
    raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  summary["wall_s"] = time.perf_counter() - start
  return summary


def run_cli(args: list[str], what: str, timeout: float) -> float:
  """Runs ``python -m fedjax_lib ARGS`` in a fresh interpreter at the repository root, as a user
  starts it; returns the process's wall seconds (start to exit)."""
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "-m", "fedjax_lib", *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=timeout, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
  return time.perf_counter() - start


# The summary `run_config` prints: seed-mean/std of best and last accuracy, the steady s/round,
# per-seed accuracies (and of the head view where an algorithm reports one), per-seed traffic.
_SUMMARY = (
    "r = run_experiment(Config(**config), log=lambda m: None)\n"
    "head = [max(run.history['test_acc_head']) for run in r.runs"
    " if 'test_acc_head' in run.history]\n"
    "summary = {'best': r.best_test_acc, 'last': r.last_test_acc,"
    " 'round_s': r.mean_round_time_s, 'best_runs': [run.best_test_acc for run in r.runs],"
    " 'last_runs': [run.last_test_acc for run in r.runs], 'head_runs': head,"
    " 'up': [run.traffic['mean_upload_floats'] for run in r.runs],"
    " 'down': [run.traffic['mean_download_floats'] for run in r.runs]}\n"
    "if curves:\n"
    "  summary['acc_curves'] = [run.history['test_acc'] for run in r.runs]\n"
    "  summary['nonfinite_runs'] = [sum(run.history['nonfinite_clients']) for run in r.runs]\n"
    "print(json.dumps(summary))\n")


def run_config(config: dict, what: str, *, curves: bool = False) -> dict:
  """Runs ``run_experiment(Config(**config))`` in a fresh interpreter; returns its summary.

  The summary: ``best``/``last`` ``(mean, std)`` over seeds, ``round_s``, ``best_runs``,
  ``last_runs``, ``head_runs`` (best ``test_acc_head`` per seed, empty when the algorithm has
  no head view), ``up``/``down`` (mean floats per trained round, per seed) and ``wall_s``; with
  ``curves`` also ``acc_curves`` (each seed's test accuracy per evaluation) and
  ``nonfinite_runs`` (each seed's count of non-finite client updates, which stop a run).
  """
  code = ("import json\n"
          "from fedjax_lib import Config, run_experiment\n"
          f"config, curves = {config!r}, {curves!r}\n" + _SUMMARY)
  return run_python(code, what)


def fail(message: str) -> None:
  """A bad argument: one ``error: ...`` line on stderr and exit status 2, as the CLI does."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def mean(values) -> float:
  return sum(values) / len(values)


def std(values) -> float:
  m = mean(values)
  return (sum((x - m) ** 2 for x in values) / len(values)) ** 0.5


def mean_std(pair) -> str:
  """A ``(mean, std)`` pair as ``0.123 ± 0.004``."""
  return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def floats_text(v: float) -> str:
  """A float count as ``1.234M``, ``56.7k`` or ``0``."""
  return f"{v / 1e6:.3f}M" if v >= 1e5 else f"{v / 1e3:.1f}k" if v else "0"


def machine() -> str:
  """The processor's model name (``/proc/cpuinfo``, else `platform`), its family and model
  numbers and widest vector instructions where ``/proc/cpuinfo`` gives them (a VM's model
  name may be only "AMD EPYC", and one name may cover CPUs with and without AVX-512), and the
  core count."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      fields = {}
      for line in f:
        if not line.strip():
          break  # the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    fields = {}
  name = fields.get("model name") or platform.processor() or platform.machine()
  flags = set(fields.get("flags", "").split())
  parts = ([f"family {fields['cpu family']} model {fields['model']}"]
           if "cpu family" in fields and "model" in fields else [])
  parts += [isa for isa, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx"))
            if flag in flags][:1]
  details = f" ({', '.join(parts)})" if parts else ""
  return f"{name}{details}, {os.cpu_count()} cores"


def has_section(path: str, name: str) -> bool:
  """Whether the file ``path`` exists and holds the markers of section ``name``."""
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    content = f.read()
  return f"<!-- {name}:begin -->" in content and f"<!-- {name}:end -->" in content


def replace_section(path: str, name: str, text: str) -> None:
  """Puts ``text`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  with open(path, encoding="utf-8") as f:
    content = f.read()
  i, j = content.index(begin) + len(begin), content.index(end)
  with open(path, "w", encoding="utf-8") as f:
    f.write(content[:i] + "\n" + text + content[j:])


def replace_readme_section(name: str, text: str) -> None:
  """Puts ``text`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in README.md."""
  replace_section(os.path.join(ROOT, "README.md"), name, text)


# FedKTL generators (experiments/fedktl_digits, experiments/htfl_digits)
_RANDOM_GENERATOR = (
    "import json, jax\n"
    "from fedjax_lib.generators import save_generator, vae\n"
    "save_generator(path, 'vae', vae.DEFAULT_CONFIG,"
    " vae.init_params(vae.DEFAULT_CONFIG, jax.random.key(0)),"
    " info={'training': {'data': 'none (random initialisation, key 0)', 'steps': 0}})\n"
    "print(json.dumps({}))\n")


def ensure_generator(kind: str, root: str, steps: int) -> str:
  """The generator folder ``root/kind``, trained (or initialised) first when it is missing."""
  path = os.path.join(root, kind)
  if os.path.isfile(os.path.join(path, "generator.json")):
    return path
  print(f"making the {kind} generator in {path}", flush=True)
  if kind == "random":
    run_python(f"path = {os.path.abspath(path)!r}\n" + _RANDOM_GENERATOR, kind)
  else:
    subprocess.run([sys.executable, "-m", "fedjax_lib.generators", "train", "--data", kind,
                    "--out", os.path.abspath(path), "--steps", str(steps), "--no-progress"],
                   cwd=ROOT, check=True)
  return path


def generator_info(path: str) -> dict:
  with open(os.path.join(path, "generator.json"), encoding="utf-8") as f:
    content = json.load(f)
  return {"path": os.path.abspath(path), "config": content["config"], **content["info"]}

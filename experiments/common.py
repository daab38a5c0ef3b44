"""What the experiment scripts share: running one configuration in a fresh process, mean/std
over seeds, and replacing a marked table in the README."""

from __future__ import annotations

import json
import os
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


def mean(values) -> float:
  return sum(values) / len(values)


def std(values) -> float:
  m = mean(values)
  return (sum((x - m) ** 2 for x in values) / len(values)) ** 0.5


def replace_readme_section(name: str, text: str) -> None:
  """Puts ``text`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in README.md."""
  readme = os.path.join(ROOT, "README.md")
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  with open(readme, encoding="utf-8") as f:
    content = f.read()
  i, j = content.index(begin) + len(begin), content.index(end)
  with open(readme, "w", encoding="utf-8") as f:
    f.write(content[:i] + "\n" + text + content[j:])

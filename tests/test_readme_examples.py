"""The README's Python examples of the run API run as written (fewer rounds, a temporary folder).

The blocks are read from README.md, so an example that drifts from the API fails here. Only the
number of rounds and the output folder are changed; the generator-bridge blocks, which need a
trained generator folder and a user's module, are covered by ``test_generators.py``.
"""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def readme_python_blocks():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    return _BLOCK.findall(f.read())


def shortened(code, tmp):
  """``code`` with at most 2 rounds and its output under ``tmp``; each change must apply."""
  for pattern, replacement in ((r"global_rounds=\d+", "global_rounds=1"),
                               (r"range\(\d+\)", "range(2)"),
                               (r'out="/tmp/ditto"', f"out={str(tmp / 'ditto')!r}")):
    if re.search(pattern, code):
      code = re.sub(pattern, replacement, code)
  return code


@pytest.mark.xla_optimized  # runs long enough to repay it (45 -> 25 s): tests/conftest.py
def test_the_run_api_examples_run(tmp_path, monkeypatch, capsys):
  blocks = [b for b in readme_python_blocks() if "generators" not in b]
  # The three of the run API: run_experiment, its continuation, and build + engine.
  assert len(blocks) == 3, blocks
  assert "run_experiment(Config(" in blocks[0] and "build(Config(" in blocks[2]
  monkeypatch.chdir(tmp_path)  # the default `out` is ./results
  namespace = {}
  for block in blocks:
    code = compile(shortened(block, tmp_path), "README.md", "exec")
    exec(code, namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out.splitlines()
  # Among run_experiment's log lines: its (mean, std), run 0's history, Ditto's (mean, std) and
  # warnings, then the engine loop's "round accuracy" lines.
  printed = [line for line in out if re.fullmatch(r"[\[(].*[\])]|\d \S+", line)]
  assert len(printed) == 5, out
  mean, std = eval(printed[0])  # pylint: disable=eval-used
  assert 0 <= std <= mean <= 1
  assert len(eval(printed[1])) == 2  # rounds 0 and 1  # pylint: disable=eval-used
  ditto_line = printed[2].replace(") [", "), [")  # "(mean, std) [warnings]"
  (ditto_mean, ditto_std), warnings = eval(ditto_line)  # pylint: disable=eval-used
  assert 0 < ditto_mean <= 1 and ditto_std == 0 and warnings == []
  assert [line.split()[0] for line in printed[3:]] == ["0", "1"]
  assert float(printed[4].split()[1]) > 0.3  # LG-FedAvg learned in one round
  assert os.path.isdir(tmp_path / "ditto") and os.path.isdir(tmp_path / "results")

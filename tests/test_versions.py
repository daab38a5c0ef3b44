"""The oldest supported library versions (`fedjax_lib.versions`): declared where pip reads
them, pinned where CI tests them, and an older installed library refused in one line."""

import os
import re
import subprocess
import sys
import tomllib

import pytest

import fedjax_lib
from fedjax_lib import cli, versions
from fedjax_lib.generators import __main__ as generators_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _floors(requirements) -> dict:
  """``{name: floor}`` of ``name>=floor`` requirement strings."""
  floors = {}
  for req in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", req.strip())
    if match:
      floors[match.group(1).lower()] = match.group(2)
  return floors


def test_the_floors_are_pyprojects_and_the_ci_pins_them():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  declared = _floors(project["dependencies"])
  for name, floor in versions.MINIMUM.items():
    if name != "jaxlib":  # jax pins its own jaxlib
      assert declared.get(name) == floor, (name, declared.get(name), floor)
  assert project["requires-python"] == ">=3.11"  # what JAX 0.10 requires
  pins = {}
  with open(os.path.join(ROOT, ".ci", "minimum-versions.txt")) as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line:
        name, _, version = line.partition("==")
        pins[name.strip().lower()] = version.strip()
  for name, floor in versions.MINIMUM.items():  # CI installs exactly the floor
    assert versions.release(pins[name]) == versions.release(floor), (name, pins[name], floor)
  for name, floor in declared.items():  # and no pin below a declared floor
    if name in pins:
      assert versions.release(pins[name]) >= versions.release(floor), (name, pins[name], floor)


def test_release_reads_the_numbers_in_front():
  assert versions.release("0.10.2") == (0, 10, 2)
  assert versions.release("0.10.2.dev20261130+cuda12") == (0, 10, 2)
  assert versions.release("2.0") < versions.release("2.0.2") < versions.release("2.1")
  assert versions.release("0.9.2") < versions.release("0.10.0")  # numbers, not text
  assert versions.release("unknown") == ()


def _installed(**overrides):
  return lambda name: overrides.get(name.replace("-", "_"), versions.MINIMUM[name])


def test_problem_names_the_first_library_below_its_floor():
  assert versions.problem(version_of=_installed()) is None
  assert versions.problem(version_of=_installed(jax="0.11.0", numpy="2.4.6")) is None
  message = versions.problem(version_of=_installed(jax="0.9.2", optax="0.2.1"))
  assert message == ("fedjax_lib needs jax >= 0.10.2, but this environment has jax 0.9.2; "
                     "upgrade it (pip install -U 'jax>=0.10.2')")
  assert "orbax-checkpoint 0.11.5" in versions.problem(
      version_of=_installed(orbax_checkpoint="0.11.5"))
  # a distribution that is not installed is left to its import
  assert versions.problem(version_of=lambda name: None) is None


def test_this_environment_passes():
  assert versions.problem() is None
  versions.check()


@pytest.fixture
def old_jax(monkeypatch):
  monkeypatch.setattr(versions, "installed", _installed(jax="0.9.2", jaxlib="0.9.2"))


@pytest.mark.parametrize("main, argv", [
    (cli.main, ["-algo", "FedAvg", "-gr", "1", "-nc", "4", "--no-progress"]),
    (generators_main.main, ["train", "--data", "sample-photos", "--steps", "1"]),
])
def test_the_command_lines_refuse_an_old_jax_in_one_line(main, argv, old_jax, tmp_path,
                                                         capsys):
  out = tmp_path / "out"
  assert main(argv + ["--out", str(out)]) == 2
  captured = capsys.readouterr()
  assert captured.err == ("error: fedjax_lib needs jax >= 0.10.2, but this environment has "
                          "jax 0.9.2; upgrade it (pip install -U 'jax>=0.10.2')\n")
  assert captured.out == ""
  assert not out.exists()


def test_the_public_names_raise_import_error(old_jax, monkeypatch):
  monkeypatch.delitem(vars(fedjax_lib), "run_experiment", raising=False)
  with pytest.raises(ImportError, match=r"needs jax >= 0\.10\.2, .* has jax 0\.9\.2"):
    fedjax_lib.run_experiment  # pylint: disable=pointless-statement
  with pytest.raises(ImportError, match="needs jax"):
    exec("from fedjax_lib import run_experiment", {})  # pylint: disable=exec-used
  assert sys.modules["fedjax_lib"] is fedjax_lib


def test_python_m_fedjax_lib_refuses_an_old_jax_before_anything_runs(tmp_path):
  """End to end: a ``jax 0.9.2`` distribution found first on the path (as a cluster's
  PYTHONPATH would put it) is refused by the command line in one line, status 2."""
  fake = tmp_path / "site"
  (fake / "jax-0.9.2.dist-info").mkdir(parents=True)
  (fake / "jax-0.9.2.dist-info" / "METADATA").write_text(
      "Metadata-Version: 2.1\nName: jax\nVersion: 0.9.2\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(fake)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  out = tmp_path / "out"
  done = subprocess.run([sys.executable, "-m", "fedjax_lib", "-gr", "1", "--out", str(out)],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
                        check=False)
  assert done.returncode == 2, done.stderr
  assert done.stderr == ("error: fedjax_lib needs jax >= 0.10.2, but this environment has "
                         "jax 0.9.2; upgrade it (pip install -U 'jax>=0.10.2')\n")
  assert done.stdout == "" and not out.exists()

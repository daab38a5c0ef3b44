"""The test harness itself: a test whose worker dies in native code is rerun once, never more;
XLA's optimisations are on exactly in the tests marked `xla_optimized` (tests/conftest.py)."""

import os
import shutil
import subprocess
import sys

CRASHING = '''
import os

def test_crashes_once():
  marker = os.path.join(os.path.dirname(__file__), "crashed")
  if not os.path.exists(marker):
    open(marker, "w").close()
    os.abort()

def test_crashes_always():
  os.abort()
'''


def _pytest_with_our_conftest(tmp_path, name: str, source: str, *args: str, env=None):
  """Runs pytest in a subprocess on one test file beside a copy of tests/conftest.py."""
  shutil.copy(os.path.join(os.path.dirname(__file__), "conftest.py"), tmp_path / "conftest.py")
  (tmp_path / name).write_text(source)
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
                         str(tmp_path)], capture_output=True, text=True, timeout=120,
                        cwd=tmp_path, env=env, check=False)


def test_a_crashed_worker_reruns_its_test_once(tmp_path):
  out = _pytest_with_our_conftest(tmp_path, "test_crash.py", CRASHING, "-n", "2", "-rf")
  text = out.stdout + out.stderr
  assert out.returncode == 1, text
  assert "1 failed, 1 passed, 2 rerun" in text, text
  assert "FAILED test_crash.py::test_crashes_always" in text, text
  assert "CRASHED ONCE, RERUN: the worker running test_crash.py::test_crashes_once" in text


SWITCHED = '''
import os
import subprocess
import sys

import jax
import pytest

def _in_a_subprocess():
  return subprocess.run([sys.executable, "-c", "import jax; print(jax.config.read("
                         "'jax_disable_most_optimizations'))"], capture_output=True, text=True,
                        check=True).stdout.strip()

def test_a_unoptimised():
  assert jax.config.read("jax_disable_most_optimizations") is True
  assert _in_a_subprocess() == "True"

@pytest.mark.xla_optimized
def test_b_optimised():
  assert jax.config.read("jax_disable_most_optimizations") is False
  assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "0"
  assert _in_a_subprocess() == "False"

def test_c_unoptimised_again():
  assert jax.config.read("jax_disable_most_optimizations") is True
  assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1"
'''


def test_xla_optimisations_follow_the_marker_in_the_test_and_its_subprocesses(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_DISABLE_MOST_OPTIMIZATIONS", "FEDJAX_TEST_XLA_DEFAULTS")}
  out = _pytest_with_our_conftest(tmp_path, "test_switch.py", SWITCHED, env=env)
  assert out.returncode == 0 and "3 passed" in out.stdout, out.stdout + out.stderr


LEAKING = '''
import os
import subprocess
import sys

PIDS = []

def test_a_leaves_a_process_running_and_fails():
  PIDS.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid)
  assert False

def test_b_that_process_is_gone():
  try:
    os.kill(PIDS[0], 0)
  except ProcessLookupError:
    return
  raise AssertionError("still running")
'''


def test_a_process_a_test_leaves_running_is_killed_when_the_test_ends(tmp_path):
  out = _pytest_with_our_conftest(tmp_path, "test_leak.py", LEAKING)
  text = out.stdout + out.stderr
  assert "1 failed, 1 passed" in text, text
  assert "FAILED test_leak.py::test_a_leaves_a_process_running_and_fails" in text, text

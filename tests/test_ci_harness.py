"""The test harness itself: a test whose worker dies in native code is rerun once, never more."""

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


def test_a_crashed_worker_reruns_its_test_once(tmp_path):
  shutil.copy(os.path.join(os.path.dirname(__file__), "conftest.py"), tmp_path / "conftest.py")
  (tmp_path / "test_crash.py").write_text(CRASHING)
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider",
                        "-rf", str(tmp_path)], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, check=False)
  text = out.stdout + out.stderr
  assert out.returncode == 1, text
  assert "1 failed, 1 passed, 2 rerun" in text, text
  assert "FAILED test_crash.py::test_crashes_always" in text, text
  assert "CRASHED ONCE, RERUN: the worker running test_crash.py::test_crashes_once" in text

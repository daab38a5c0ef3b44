import os
import shutil
import subprocess
import tempfile

import pytest


# Tests run on CPU; keep XLA from grabbing every core's worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _add_xla_flag(name: str, value: str) -> None:
  """``--name=value`` added to ``XLA_FLAGS`` (inherited by the CLI subprocesses), unless the
  caller's environment names the flag already."""
  flags = os.environ.get("XLA_FLAGS", "")
  if name not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()


# Eight fake CPU devices, for the sharding tests (tests/test_sharding.py); everything else runs
# on the first device as before.
_add_xla_flag("xla_force_host_platform_device_count", "8")

# FEDJAX_TEST_XLA_DEFAULTS=1 runs the suite with XLA's defaults: none of the settings below.
_XLA_DEFAULTS = os.environ.get("FEDJAX_TEST_XLA_DEFAULTS") == "1"

# XLA:CPU's classic fusion emitters instead of the newer MLIR ones: the suite's time is
# compiling hundreds of small programs, and these compile ~26% faster (the Ditto conformance
# test: 10.7 -> 7.9 s of compilation, measured 2026-12-02). Every comparison in the suite is
# between programs compiled the same way. The library leaves XLA's default alone: with the
# classic emitters Ditto's CNN round on digits ran slower (0.72-0.92 s against 0.52-0.53 s).
if not _XLA_DEFAULTS:
  _add_xla_flag("xla_cpu_use_fusion_emitters", "false")

# LLVM code generation of a program in one piece, not split into parts compiled on a thread
# pool (`xla_cpu_parallel_codegen_split_count`): the suite's two workers already keep both
# cores busy, and the split only adds work there. Measured 2026-12-07 on the 2-core AVX-512
# VM, two processes each running the conformance test of Ditto, FedRep, FedALA and FedProto
# at once (as the two workers do): 17.2-18.1 s -> 14.9-15.3 s unoptimised (compilation
# 10.5-10.9 -> 8.6 s), 37.3 -> 34.3 s optimised. (A process alone on the machine compiles
# optimised programs faster with the split, 23-24 against 28-30 s: the library keeps XLA's
# default.) It changes no number: the whole suite passed with it, the engine numbers pinned to
# the bit (tests/test_engine_regression.py) included.
if not _XLA_DEFAULTS:
  _add_xla_flag("xla_cpu_parallel_codegen_split_count", "1")

# XLA with most of its optimisations off (`jax_disable_most_optimizations`: LLVM at -O0,
# none of its expensive passes), for every test that does not say otherwise: the suite's time
# is compiling hundreds of small programs, each run for a few steps, and those compile in
# about half the time. Measured 2026-12-03 on a 2-core AVX2 VM (test time summed over both
# workers): the conformance suites 0.46-0.61x; the whole suite 0.81x unoptimised throughout,
# 0.85x with the marked tests below optimised (1,491 -> 1,273 s of wall time). A test that
# runs long enough for the optimised program to repay its compilation (the learning tests:
# up to 4x slower unoptimised) or whose numbers were pinned optimised carries
# `@pytest.mark.xla_optimized`; the setting is switched between tests, never inside one, and
# every comparison in a test is between programs compiled the same way.
if not _XLA_DEFAULTS:
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

# Every process of a test run (the xdist workers, and the CLI subprocesses they start, through
# TMPDIR) makes its temporary files in one folder, removed when the run ends: tfds leaves an
# empty folder in the temporary directory each time it builds a dataset that is not prepared
# (`DatasetInfo.initialize_from_bucket` makes one before it finds its bucket disabled), which
# the mock-data tests do thousands of times a run. pytest's `tmp_path` folders are made there
# too and go with it; to keep them for a look after a run, pass `--basetemp DIR`.
_TMP_OWNER = "FEDJAX_TEST_TMP_ROOT" not in os.environ
if _TMP_OWNER:
  os.environ["FEDJAX_TEST_TMP_ROOT"] = os.environ["TMPDIR"] = tempfile.mkdtemp(
      prefix="fedjax-tests-")
  tempfile.tempdir = None  # gettempdir() reads TMPDIR again

# One persistent XLA compilation cache per test run, shared by the xdist workers and every CLI
# subprocess they start (the environment is inherited): the suite compiles the same small
# programs many times over (each CLI test is a fresh process), and loading one is ~10x cheaper.
# Set before JAX is imported; the run's uid names it, so both workers find the same folder.
_CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _CACHE_OWNER:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      tempfile.gettempdir(),
      f"fedjax-tests-xla-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  # JAX writes an entry in place (no lock without `jax_compilation_cache_max_size`), so a
  # process may read one that another is still writing, or one a killed process left half
  # written: it warns and compiles the program itself, as it would without the cache. Those
  # warnings are not the program's output, which tests check line by line: silenced.
  os.environ["PYTHONWARNINGS"] = ",".join(
      [w for w in [os.environ.get("PYTHONWARNINGS", "")] if w] +
      [f"ignore:Error {verb} persistent compilation cache entry:UserWarning"
       for verb in ("reading", "writing")])


def pytest_unconfigure(config):
  # The controller (or a run without workers) removes the folders when the run ends.
  if _TMP_OWNER and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["FEDJAX_TEST_TMP_ROOT"], ignore_errors=True)
  if _CACHE_OWNER and not hasattr(config, "workerinput"):
    folder = os.environ["JAX_COMPILATION_CACHE_DIR"]
    shutil.rmtree(folder, ignore_errors=True)
    if hasattr(config, "testrun_uid"):  # workers started before this file was read
      shutil.rmtree(folder.replace(str(os.getpid()), config.testrun_uid), ignore_errors=True)


# A worker killed by a fatal signal inside native code (seen once in CI: a crash inside
# XLA while `test_htfl_conformance[FedL2G-feat]` ran, which passes on every other run) fails
# its test with no traceback. Such a test is run once more on a fresh worker; a second crash,
# or a failure, fails the run as before. Each rerun is listed at the end of the report.
_CRASHED: dict[str, int] = {}


def pytest_handlecrashitem(crashitem, report, sched):
  if _CRASHED.get(crashitem, 0) == 0:
    _CRASHED[crashitem] = 1
    sched.mark_test_pending(crashitem)
    report.outcome = "rerun"


def pytest_report_teststatus(report, config):  # pylint: disable=unused-argument
  if report.outcome == "rerun":
    return "rerun", "R", "RERUN"
  return None


def pytest_terminal_summary(terminalreporter):
  for nodeid in _CRASHED:
    terminalreporter.write_line(f"CRASHED ONCE, RERUN: the worker running {nodeid} died "
                                "(a fatal signal in native code); its rerun's result counts",
                                yellow=True)


def _xla_optimizations_on() -> bool:
  return os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") != "1"


def _set_xla_optimizations(on: bool) -> None:
  """Turns XLA's optimisations on or off for this process and the CLI subprocesses it starts
  (they inherit the environment). jit's in-memory caches do not key on the setting: they are
  cleared, or a function object compiled under one setting would run under the other (seen
  before this was done: FedTGP's executors then differed by 3e-3 in the train loss). The
  persistent compilation cache below does key on it (XLA's debug options are hashed)."""
  if on == _xla_optimizations_on():
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.clear_caches()
  jax.config.update("jax_disable_most_optimizations", not on)
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0" if on else "1"


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "xla_optimized: the test runs (and its subprocesses run) with XLA's "
      "optimisations on; see tests/conftest.py")


def pytest_runtest_setup(item):
  # before the test's fixtures are set up, so they compile under the test's setting
  if not _XLA_DEFAULTS:
    _set_xla_optimizations(item.get_closest_marker("xla_optimized") is not None)


# A test that starts a long CLI run and fails before stopping it (an assertion between
# `Popen` and the kill: seen in test_edges.py's `-gr 100000` run under JAX 0.10.0, whose
# stderr lines the test did not expect) left the process running for the rest of the suite,
# eating a core and the suite's time. Every process a test starts and leaves running is
# killed when the test ends, pass or fail.
@pytest.fixture(autouse=True)
def _no_process_outlives_its_test(monkeypatch):
  started = []
  original = subprocess.Popen.__init__

  def init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    started.append(self)

  monkeypatch.setattr(subprocess.Popen, "__init__", init)
  yield
  for proc in started:
    if proc.poll() is None:
      proc.kill()
      proc.wait(timeout=60)

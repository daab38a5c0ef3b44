"""``--compile-cache`` / ``Config.compile_cache`` (`fedjax_lib.compile_cache`): runs that share
the folder load each other's programs, with the same results to the bit, also when they start
together; the folder is kept under its limit, least recently used first; a refused run
creates nothing (tests/test_bad_inputs.py); an entry a killed run left cut short is written
again, silently."""

import json
import os
import stat
import subprocess
import sys
import zlib

import jax
import pytest
from jax._src import compilation_cache as jax_compilation_cache
from jax.experimental.compilation_cache import compilation_cache

from fedjax_lib import Config, compile_cache, run_experiment
from fedjax_lib.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["-m", "mlr", "-nc", "4", "-gr", "2", "--no-progress", "--no-plot"]
CURVES = ("test_acc", "test_auc", "train_loss")


def _start(out, cache, *extra):
  return subprocess.Popen(
      [sys.executable, "-m", "fedjax_lib", *ARGS, "--out", str(out), "--compile-cache",
       str(cache), *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def _finish(proc):
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  assert "Warning" not in stderr, stderr[-3000:]  # e.g. JAX's "Error reading ... cache entry"
  return stdout


def _curves(out):
  (name,) = [n for n in os.listdir(out) if n.endswith("_0.json")]
  with open(os.path.join(out, name), encoding="utf-8") as f:
    res = json.load(f)
  return {k: res[k] for k in CURVES}


def _entries(cache):
  return sorted(n for n in os.listdir(cache) if n.endswith("-cache"))


def test_runs_sharing_the_folder_load_its_programs_with_the_same_results(tmp_path):
  cache = tmp_path / "cache"
  # Two runs at once on an empty folder: both compile, both write (JAX writes without a lock).
  first = [_start(tmp_path / f"out{i}", cache, "-q") for i in range(2)]
  for proc in first:
    _finish(proc)
  written = _entries(cache)
  assert written
  assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700  # JAX runs what it holds: owner only
  # A third run loads every program: it compiles none anew, so it writes no new entry.
  report = _finish(_start(tmp_path / "out2", cache))
  assert f"compile cache: {cache} ({len(written)} programs)" in report
  assert _entries(cache) == written
  # Damage: an entry a killed writer left empty, one cut short, a killed writer's temporary
  # file, and one of a running writer (this process). A fourth run reads the damaged entries
  # as misses, silently, compiles those programs and writes them whole again.
  sizes = {name: os.path.getsize(cache / name) for name in written}
  empty, cut = sorted(written, key=sizes.get)[-2:]
  (cache / empty).write_bytes(b"")
  (cache / cut).write_bytes((cache / cut).read_bytes()[:100])
  stale = cache / f".{empty[:-len('-cache')]}-cache.tmp-{2**40}-0123abcd"
  running = cache / f".{cut[:-len('-cache')]}-cache.tmp-{os.getpid()}-0123abcd"
  stale.write_bytes(b"partial")
  running.write_bytes(b"partial")
  _finish(_start(tmp_path / "out3", cache, "-q"))
  assert _entries(cache) == written
  check = compile_cache.FolderCache(str(cache), jax_compilation_cache.decompress_executable)
  for name in (empty, cut):  # whole again (a recompiled executable's size varies a little)
    assert os.path.getsize(cache / name) > sizes[name] // 2
    assert check.get(name[:-len("-cache")]) is not None
  assert not stale.exists() and running.exists()
  curves = [_curves(tmp_path / f"out{i}") for i in range(4)]
  assert curves[0] == curves[1] == curves[2] == curves[3]


@pytest.fixture
def restore_jax_cache():
  """The suite's own cache settings (tests/conftest.py), put back after the test."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_compilation_cache_max_size", "jax_enable_compilation_cache")
  saved = {name: getattr(jax.config, name) for name in names}
  yield
  compilation_cache.reset_cache()
  for name, value in saved.items():
    jax.config.update(name, value)


@pytest.mark.usefixtures("restore_jax_cache")
def test_python_api_writes_then_loads(tmp_path):
  cache = tmp_path / "cache"
  # a stacked sweep: its programs are compiled ahead, by the memory check, with the cache on
  config = Config(model="mlr", num_clients=4, global_rounds=2, plot=False, executor="vmap",
                  sweep={"seed": [0, 1]}, compile_cache=str(cache))
  first = run_experiment(config.replace(out=str(tmp_path / "a")), quiet=True)
  written = _entries(cache)
  assert written and jax.config.jax_compilation_cache_dir == str(cache)
  second = run_experiment(config.replace(out=str(tmp_path / "b")), quiet=True)
  assert _entries(cache) == written  # jit's in-memory caches missed, the folder did not
  assert ([r.history["test_acc"] for r in first.runs] ==
          [r.history["test_acc"] for r in second.runs])


def test_folder_names(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.resolve("auto") == str(tmp_path / "xdg" / "fedjax_lib" / "xla")
  assert compile_cache.resolve("") == ""
  assert compile_cache.resolve(str(tmp_path / "c")) == str(tmp_path / "c")
  assert compile_cache.problem("auto") is None
  assert compile_cache.problem(str(tmp_path / "new" / "deeper")) is None
  (tmp_path / "file").write_text("x")
  assert "is a file" in compile_cache.problem(str(tmp_path / "file"))
  assert "cannot be created" in compile_cache.problem(str(tmp_path / "file" / "below"))
  (tmp_path / "shared").mkdir(mode=0o777)
  os.chmod(tmp_path / "shared", 0o777)  # whatever the umask
  assert "writable by other users" in compile_cache.problem(str(tmp_path / "shared"))
  with pytest.raises(ConfigError, match="compile_cache=.*is a file"):
    Config(compile_cache=str(tmp_path / "file")).validate()
  assert not (tmp_path / "xdg").exists() and not (tmp_path / "new").exists()  # checks only


def test_prune_removes_the_least_recently_used_first(tmp_path):
  for i, name in enumerate(["old", "mid", "new"]):
    (tmp_path / f"{name}-cache").write_bytes(b"x" * 100)
    os.utime(tmp_path / f"{name}-cache", (1000 + i, 1000 + i))  # (access, write) times
  (tmp_path / "old-atime").write_bytes(b"t")   # JAX's access record goes with its entry
  (tmp_path / "notes.txt").write_bytes(b"y" * 1000)  # not an executable: never counted
  assert compile_cache.prune(str(tmp_path), 300) == 0
  assert compile_cache.prune(str(tmp_path), 150) == 2
  assert sorted(os.listdir(tmp_path)) == ["new-cache", "notes.txt"]


def test_folder_cache_writes_whole_entries_and_drops_damaged_ones(tmp_path):
  cache = compile_cache.FolderCache(str(tmp_path), zlib.decompress)
  whole = zlib.compress(b"an executable" * 100)
  assert cache.get("k") is None  # missing: a miss
  cache.put("k", whole)
  assert os.listdir(tmp_path) == ["k-cache"]  # renamed into place: no temporary file left
  assert cache.get("k") == whole
  cache.put("k", zlib.compress(b"another"))  # the first writer's entry stays (as JAX's)
  assert cache.get("k") == whole
  (tmp_path / "cut-cache").write_bytes(whole[:-5])  # a killed writer's
  assert cache.get("cut") is None and not (tmp_path / "cut-cache").exists()
  cache.put("cut", whole)
  assert cache.get("cut") == whole
  for key in ("", "../k", ".hidden"):
    with pytest.raises(ValueError):
      cache.get(key)

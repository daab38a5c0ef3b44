"""Clients sharded over devices: 8 fake CPU devices (tests/conftest.py) against one device.

Covers the runner path (FedAvg, Ditto, FedALA), padding of client counts and cohorts
that do not divide the device count, the chunked executor under shard_map, the weighted psum,
resuming a checkpoint on another device count, and a real two-process (multi-host) run.
"""

import functools
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fedjax_lib import Config, run_experiment
from fedjax_lib.core import aggregate
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.errors import ConfigError
from tests.test_engine import _engine, _run, _small_data

QUIET = dict(log=lambda msg: None)
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def _config(out, **kw):
  base = dict(model="dnn", num_clients=10, learning_rate=0.05, global_rounds=2,
              executor="vmap", out=str(out), progress=False)
  base.update(kw)
  return Config(**base)


@functools.lru_cache(maxsize=None)
def _single_device(algorithm):
  with tempfile.TemporaryDirectory() as tmp:
    return run_experiment(_config(tmp, algorithm=algorithm), **QUIET).runs[0].history


def _assert_same_history(a, b):
  for key in a:
    if key.startswith(("test_acc", "test_auc")):
      np.testing.assert_allclose(a[key], b[key], atol=1e-9, err_msg=key)
  np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=2e-5)


@pytest.mark.parametrize("algorithm", ["FedAvg", "Ditto", "FedALA"])
def test_sharded_run_equals_single_device(algorithm, tmp_path_factory):
  """10 clients on 8 devices (padded to 16 rows): every view's accuracy equal, losses close."""
  single = _single_device(algorithm)
  sharded = run_experiment(_config(tmp_path_factory.mktemp("sharded"), algorithm=algorithm,
                                   devices=8), **QUIET).runs[0].history
  _assert_same_history(single, sharded)


def _sharded_engine(algo, executor, data, jr, rjr, devices=8):
  eng = _engine(algo, executor, data, jr=jr, rjr=rjr)
  return engine_lib.Engine(eng.algorithm, eng.data, eng.participation, executor=executor,
                           chunk_size=2, eval_chunk_size=4,
                           mesh=engine_lib.client_mesh(devices))


@pytest.mark.parametrize("algo,executor,jr,rjr", [
    ("Ditto", "chunked", 0.7, False),   # cohort of 7 padded to 8 slots, gathered
    ("Local", "vmap", 0.7, True),       # random join ratio: all 11 clients in place, masked
])
def test_partial_participation_and_padding(algo, executor, jr, rjr):
  data = _small_data(num_clients=11)
  s1, c1, h1 = _run(_engine(algo, "vmap", data, jr=jr, rjr=rjr))
  eng = _sharded_engine(algo, executor, data, jr, rjr)
  s2, c2, h2 = _run(eng)
  for a, b in zip(h1, h2):
    np.testing.assert_allclose(a["test_acc"], b["test_acc"], atol=1e-9)
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  jax.tree.map(close, s1, s2)
  jax.tree.map(close, c1, eng.export_states(c2))
  # One compiled round and evaluation; states laid out along the clients axis, 16 rows.
  assert eng.trace_counts["round"] == 1 and eng.trace_counts["evaluate"] == 1
  leaf = jax.tree.leaves(c2)[0]
  assert leaf.shape[0] == 16 and leaf.sharding.spec == P(engine_lib.CLIENTS)
  assert len(leaf.sharding.device_set) == 8


def test_weighted_average_psum_matches_numpy():
  """Inside shard_map the weighted mean is a local sum plus one psum; padded slots weigh 0."""
  mesh = engine_lib.client_mesh(8)
  r = np.random.default_rng(0)
  x = r.normal(size=(16, 3, 2)).astype(np.float32)
  w = np.r_[r.integers(1, 9, 13), np.zeros(3)].astype(np.float32)

  def body(x, w):
    with aggregate.client_axis(engine_lib.CLIENTS):
      return aggregate.weighted_average(x, w)

  out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("clients"), P("clients")),
                              out_specs=P(), check_vma=False))(jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_allclose(out, np.tensordot(w / w.sum(), x, axes=1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, aggregate.weighted_average(jnp.asarray(x), jnp.asarray(w)),
                             rtol=1e-5, atol=1e-6)


def test_resume_on_another_device_count(tmp_path_factory):
  """A checkpoint written on 8 devices continues on 1: checkpoints hold the N real clients."""
  out = tmp_path_factory.mktemp("resume")
  run_experiment(_config(out, algorithm="Ditto", devices=8, global_rounds=1,
                         checkpoint_every=1), **QUIET)
  resumed = run_experiment(_config(out, algorithm="Ditto", devices=1, checkpoint_every=1),
                           **QUIET).runs[0].history
  single = _single_device("Ditto")
  _assert_same_history(single, resumed)


@pytest.mark.parametrize("kw,needle", [
    (dict(devices=9), "devices=9"),
    (dict(devices=2, executor="sequential"), "executor='sequential'"),
    (dict(devices=-1), "devices=-1"),
])
def test_bad_device_settings(kw, needle, tmp_path):
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
    run_experiment(_config(tmp_path, **kw), **QUIET)
  assert not os.listdir(tmp_path)


def test_two_processes_equal_one(tmp_path):
  """Multi-host: two processes (2 CPU devices each, gloo collectives) launched as on two
  hosts with --distributed; process 0 alone writes results, equal to a one-process run."""
  args = [sys.executable, "-m", "fedjax_lib", "-algo", "Ditto", "-m", "dnn", "-lr", "0.05",
          "-gr", "2", "-nc", "10", "--executor", "vmap", "--no-progress"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  port = 20000 + os.getpid() % 20000
  procs = [subprocess.Popen(args + ["--distributed", "--devices", "0", "--out",
                                    str(tmp_path / "multi")],
                            env={**env, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                 "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  assert "best test accuracy" in outs[0][0] and "best test accuracy" not in outs[1][0]
  single = subprocess.run(args + ["--out", str(tmp_path / "single")], env=env, check=True,
                          capture_output=True, text=True, timeout=300)
  del single
  read = lambda d: json.load(open(tmp_path / d / "digits_Ditto_test_0.json"))
  multi, one = read("multi"), read("single")
  assert multi["test_acc"] == one["test_acc"]
  assert multi["test_acc_global"] == one["test_acc_global"]
  np.testing.assert_allclose(multi["train_loss"], one["train_loss"], rtol=2e-5)

"""Shared test fixtures that are not pytest fixtures: a tiny generator for FedKTL, and the
hyperparameters that keep every algorithm quick in the shared suites.

`tiny_generator` is a randomly initialised built-in VAE decoder (w_dim 4, 16×16×3, width 4):
a real `fedjax_lib.generators` generator, small enough that FedKTL's server compiles in
seconds. `tiny_generator_path` writes it once per process as a generator folder (what
``-GPath`` reads). `suite_params` is what the conformance, engine, dtype and sharding suites
pass each algorithm. `traced_eqns` lists a function's traced equations, sub-jaxprs included.
"""

import functools
import subprocess
import sys
import tempfile

import jax
from jax.extend import core as jax_core

from fedjax_lib import generators
from fedjax_lib.generators import vae

TINY_CONFIG = {"w_dim": 4, "resolution": 16, "channels": 3, "width": 4}


def traced_eqns(fn, *args) -> list:
  """Every equation of ``fn``'s jaxpr at ``args``, those of its sub-jaxprs (loop bodies,
  custom-VJP functions, ...) included, depth first."""
  eqns = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      eqns.append(eqn)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return eqns


@functools.lru_cache(maxsize=None)
def tiny_generator():
  """``(generator, params)`` of a randomly initialised tiny VAE."""
  config = vae.resolve_config(TINY_CONFIG)
  return (generators.build_generator("vae", config),
          vae.init_params(config, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def tiny_generator_path() -> str:
  """A generator folder holding :func:`tiny_generator` (written once per process)."""
  path = tempfile.mkdtemp(prefix="fedjax_tiny_generator_")
  generators.save_generator(path, "vae", TINY_CONFIG, tiny_generator()[1])
  return path


def fedktl_params(**overrides) -> dict:
  """FedKTL hyperparameters for fast tests: the tiny generator, two server epochs."""
  return {"generator_path": tiny_generator_path(), "server_epochs": 2,
          "server_batch_size": 8, **overrides}


def as_images(data, shape=(2, 2, 3)):
  """``data`` (flat toy features) with every sample reshaped to a tiny image: FedKTL generates
  images, so it runs the shared suites on image-shaped samples."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  return dataclasses.replace(data, x=data.x.reshape(-1, *shape))


# Small sizes for the suites' tiny models: FedMRL's s must not exceed the dnn's 100 features
# (default 128); FedGen's default generator (512 wide, 100 Adam steps) is slow to compile and
# amplifies rounding (see its Numerics), at 4/8 wide the executors agree to the bit; FedL2G's
# default 50 warm-up rounds would leave the suites' 2-3 rounds without local training.
_SUITE_PARAMS = {
    "FedMRL": {"sub_feature_dim": 8},
    "FedGen": {"noise_dim": 4, "hidden_dim": 8, "server_epochs": 2},
    "FedGen-PFLlib": {"noise_dim": 4, "hidden_dim": 8, "server_epochs": 2},
    "FedL2G-feat": {"warmup_rounds": 1},
    "FedL2G-logit": {"warmup_rounds": 1},
}


def suite_params(name: str, **overrides):
  """The hyperparameters the shared suites give algorithm ``name`` (``overrides`` on top),
  or None: its defaults."""
  base = fedktl_params() if name == "FedKTL" else _SUITE_PARAMS.get(name)
  if base is None and not overrides:
    return None
  return {**(base or {}), **overrides}


def assert_mixed_heads_refused(algorithm, data, match: str) -> None:
  """Two architecture groups of ``algorithm`` (4 clients), ``dnn`` and ``dnn+head16-8`` (a
  two-layer head): the engine's compatibility check refuses them before anything runs."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import pytest  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from fedjax_lib.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models import make_model  # pylint: disable=import-outside-toplevel
  models = {n: make_model(n, data.sample_shape, data.num_classes, feature_dim=16)
            for n in ("dnn", "dnn+head16-8")}
  groups = [engine_lib.Group(n, dataclasses.replace(algorithm, model=m), (k, k + 2))
            for k, (n, m) in enumerate(models.items())]
  eng = engine_lib.Engine(groups, engine_lib.DeviceData.from_federated(data),
                          engine_lib.Participation(4), executor="vmap", model_cycle=[0, 1])
  with pytest.raises(ConfigError, match=match):
    eng.check_compatible(data.x[0])


def assert_cli_refuses(argv, words, tmp_path, capsys) -> None:
  """``fedjax`` with ``argv`` (plus a one-round, four-client run into ``tmp_path/out``) exits
  with status 2 and one ``error: ...`` line containing every string of ``words``, writing
  nothing."""
  import sys  # pylint: disable=import-outside-toplevel
  import pytest  # pylint: disable=import-outside-toplevel
  from fedjax_lib import cli  # pylint: disable=import-outside-toplevel
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as exc:  # parser errors exit from inside argparse
    sys.exit(cli.main(list(argv) + ["-gr", "1", "--out", str(out), "--no-progress", "-nc",
                                    "4"]))
  err = capsys.readouterr().err
  assert exc.value.code == 2, err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert all(w in err for w in words), err
  assert not out.exists()


def numpy_cross_entropy(logits, y) -> float:
  """Mean softmax cross-entropy of ``logits`` [n, C] at labels ``y``, in numpy."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  z = logits - logits.max(1, keepdims=True)
  return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def numeric_grad(f, tree, eps=1e-6):
  """Central differences of ``f(tree)`` w.r.t. every entry of every leaf (numpy, float64)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  leaves, treedef = jax.tree.flatten(tree)
  grads = []
  for i, leaf in enumerate(leaves):
    g = np.zeros_like(leaf)
    for j in np.ndindex(leaf.shape):
      for sign in (1, -1):
        moved = [a.copy() for a in leaves]
        moved[i][j] += sign * eps
        g[j] += sign * f(jax.tree.unflatten(treedef, moved)) / (2 * eps)
    grads.append(g)
  return jax.tree.unflatten(treedef, grads)


def assert_replicated(tree):
  """Every device holds the same bytes of every leaf (a server state on a client mesh)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  for leaf in jax.tree.leaves(tree):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 8 or leaf.sharding.is_fully_replicated
    for shard in shards[1:]:
      np.testing.assert_array_equal(shard, shards[0])


def ended_pid() -> int:
  """The id of a process that has ended (its pid is not reused this soon): what a writer
  killed earlier leaves in its temporary names."""
  ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True)
  return int(ended.stdout)

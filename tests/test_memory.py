"""Memory estimates (`fedjax_lib.memory`): close to the measured peak, and refusals with numbers."""

import json
import os
import resource
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from fedjax_lib import memory
from fedjax_lib.errors import ConfigError

# A sweep of 8 runs side by side (4 seeds x 2 learning rates), Ditto on digits with the DNN:
# its round program's temporaries are a large part of the process (about 0.4 of 1.1 GB).
# The child estimates, then runs the loop, and reports the estimate, its peak RSS and which
# programs the loop compiled.
_CHILD = textwrap.dedent("""
    import json, logging, resource, sys
    import jax
    from fedjax_lib import Config, memory, runner, sweep as sweep_lib
    config = Config(algorithm="Ditto", model="dnn", num_clients=20, global_rounds=0,
                    executor="vmap", sweep={"seed": [0, 1, 2, 3], "learning_rate": [0.01, 0.02]},
                    progress=False, out=sys.argv[1])
    first = sweep_lib.combo_config(config, sweep_lib.combinations(config.sweep)[0]).validate()
    built = runner.build(first)
    specs = runner.run_specs(config, "x", built.algorithm, built.data, built.models["dnn"])
    estimate = memory.estimate_runs(built.engine, len(specs), list(specs[0].hparams))
    compiled = []
    class Names(logging.Handler):
      def emit(self, record):
        message = record.getMessage()
        if message.startswith("Finished XLA compilation of "):
          compiled.append(message.split()[4])
    logging.getLogger("jax._src.dispatch").addHandler(Names())
    jax.config.update("jax_log_compiles", True)
    runner.run_loop(built.engine, specs, config, lambda line: None)
    peak = memory.peak_rss_bytes()
    print(json.dumps({"peak": peak, "total": estimate.total, "in_use": estimate.in_use,
                      "additional": estimate.additional,
                      "programs": [p.name for p in estimate.programs],
                      "compiled_in_loop": compiled}))
""")


def _run_child(code: str, *args) -> dict:
  """Runs ``code`` in a fresh process (one CPU device); its last stdout line, as JSON.

  Each child reports its own peak RSS (``VmHWM``, `memory.peak_rss_bytes`): the parent's
  ``RUSAGE_CHILDREN`` is the largest child so far, which an earlier test may set, and Linux
  carries a process's ``ru_maxrss`` across exec, so a child of a large pytest worker would
  report the worker's peak as its own.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # measure compiling, not loading from the cache
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "")
  out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=env, timeout=300, check=True)
  report = json.loads(out.stdout.strip().splitlines()[-1])
  children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  assert children_peak >= report.get("peak", 0) * 0.99  # the kernel's view agrees
  return report


def test_sweep_estimate_is_close_to_the_measured_peak_and_compiles_once(tmp_path):
  report = _run_child(_CHILD, str(tmp_path))
  peak = report["peak"]
  assert report["programs"] == ["init", "round", "evaluation"]
  # Measured: 1.08 GB estimated for a 1.10 GB peak (jax 0.10.2, XLA:CPU).
  assert 0.8 <= report["total"] / peak <= 1.25, (report, peak)
  # The part the programs add is the part being estimated: it must carry the weight too.
  measured_additional = peak - report["in_use"]
  assert 0.6 <= report["additional"] / measured_additional <= 1.6, (report, peak)
  # jax.jit reused the ahead-of-time compilations: the stacked programs compiled once.
  assert not {"jit(masked_round)", "jit(init)"} & set(report["compiled_in_loop"]), report


_CONV_CHILD = textwrap.dedent("""
    import json, resource
    import jax, jax.numpy as jnp
    from fedjax_lib import memory
    # What vmap makes of a convolution over 40 per-client kernels: a grouped convolution.
    x = jnp.ones((40, 10, 12, 12, 32), jnp.float32)
    k = jnp.ones((40, 5, 5, 32, 64), jnp.float32)
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    f = jax.jit(lambda x, k: jax.vmap(conv)(x, k).sum())
    compiled = f.lower(x, k).compile()
    estimate = memory.program_memory("conv", compiled, "cpu")
    jax.block_until_ready((x, k))
    before = memory.peak_rss_bytes()
    compiled(x, k).block_until_ready()
    after = memory.peak_rss_bytes()
    print(json.dumps({"scratch": estimate.scratch, "temporaries": estimate.temporaries,
                      "grew": after - before}))
""")


def test_grouped_convolution_scratch_matches_the_measured_growth():
  report = _run_child(_CONV_CHILD)
  # im2col of the grouped convolution: 10 images x 8x8 outputs x 5x5 taps x 40*32 channels.
  assert report["scratch"] == 10 * 8 * 8 * 25 * 40 * 32 * 4
  # XLA:CPU allocates it at run time, outside memory_analysis (measured: within 10%).
  grew = report["grew"]
  assert 0.7 <= (report["scratch"] + report["temporaries"]) / grew <= 1.5, report


def test_scratch_is_zero_without_grouped_convolutions():
  x = jnp.ones((10, 12, 12, 32))
  k = jnp.ones((5, 5, 32, 64))
  compiled = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(x, k).compile()
  assert memory.grouped_conv_scratch_bytes(compiled.as_text()) == 0
  assert memory.program_memory("conv", compiled, "cpu").bytes > 0


def test_available_memory_is_positive_and_below_the_total():
  available, total = memory.available_bytes(), memory.total_bytes()
  assert available is not None and total is not None
  assert 0 < available < total
  assert 0 < memory.in_use_bytes() < total


def test_check_fits_refuses_with_both_numbers_and_what_to_do():
  memory.check_fits(int(5e9), int(9.8e9), "the sweep")  # fits: nothing raised
  memory.check_fits(int(50e9), None, "the sweep")  # unknown availability: not refused
  with pytest.raises(ConfigError) as err:
    memory.check_fits(int(13.4e9), int(9.8e9), "the sweep of 4 combinations")
  message = str(err.value)
  assert "\n" not in message
  assert "the sweep of 4 combinations needs about 13.4 GB" in message
  assert "9.8 GB is available" in message
  for advice in ("fewer combinations", "--executor sequential", "--chunk-size"):
    assert advice in message
  # What the process already holds is part of the need and not of what is available.
  memory.check_fits(int(10e9), int(9.8e9), "the sweep", in_use=int(1e9))
  with pytest.raises(ConfigError, match=r"13\.4 GB .*2\.0 GB of it already in use.*9\.8 GB more"):
    memory.check_fits(int(13.4e9), int(9.8e9), "the sweep", in_use=int(2e9))


def test_runs_one_after_another_are_estimated_by_their_states(tmp_path, monkeypatch):
  from fedjax_lib import Config, runner  # pylint: disable=import-outside-toplevel
  config = Config(algorithm="Ditto", model="dnn", num_clients=4, executor="sequential",
                  progress=False, out=str(tmp_path))
  engine = runner.build(config).engine
  estimate = memory.estimate_runs(engine, 3)
  assert estimate.programs == ()  # nothing compiled
  one_run = sum(a.size * a.dtype.itemsize
                for a in jax.tree.leaves(engine.state_shapes(engine.data.x[0])))
  assert estimate.states == estimate.additional == 3 * one_run
  assert estimate.total == estimate.in_use + 3 * one_run
  estimate.check("the 3 repetitions")  # fits
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: one_run)
  with pytest.raises(ConfigError, match=r"^the 3 repetitions needs about .* GB of memory"):
    estimate.check("the 3 repetitions")


def test_a_sweep_that_does_not_fit_is_refused_before_anything_is_written(tmp_path):
  """End to end: the CLI states the memory and refuses, exit 2, one line, no folder."""
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "fedjax_lib", "-algo", "Ditto", "-m", "dnn", "-nc", "6", "-gr", "1",
       "--executor", "vmap", "--sweep", "lr=0.01,0.005", "--no-progress", "--out", str(out)],
      capture_output=True, text=True, env=dict(os.environ, FEDJAX_MEMORY_LIMIT_GB="0.3"))
  assert proc.returncode == 2, proc.stderr
  assert "memory: the sweep of 2 combinations needs about" in proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: the sweep of 2 combinations needs "
                                                 "about"), lines
  assert "FEDJAX_MEMORY_LIMIT_GB=0.3" in lines[0] and "--executor sequential" in lines[0]
  assert not out.exists()


def test_memory_limit_variable_is_validated(monkeypatch):
  monkeypatch.setenv(memory.LIMIT_VARIABLE, "lots")
  with pytest.raises(ConfigError, match="FEDJAX_MEMORY_LIMIT_GB='lots' is not a positive"):
    memory.memory_limit()
  monkeypatch.setenv(memory.LIMIT_VARIABLE, "2.5")
  assert memory.memory_limit() == int(2.5e9)
  assert memory.available_bytes() == int(2.5e9) - memory.in_use_bytes()


def test_one_run_is_refused_when_its_states_cannot_fit(tmp_path, monkeypatch):
  """A single run (any executor) is checked by its states before any is made: refused when
  they exceed what is available, by one byte, with nothing written; run when they fit."""
  from fedjax_lib import Config, runner  # pylint: disable=import-outside-toplevel
  config = Config(algorithm="Ditto", model="dnn", num_clients=4, global_rounds=0,
                  progress=False, out=str(tmp_path / "out"))
  engine = runner.build(config).engine
  estimate = memory.estimate_runs(engine, 1)
  one_run = sum(a.size * a.dtype.itemsize
                for a in jax.tree.leaves(engine.state_shapes(engine.data.x[0])))
  assert estimate.programs == () and estimate.states == one_run
  assert "the states of one run only" in estimate.covers
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: one_run - 1)
  with pytest.raises(ConfigError, match=r"^the run needs about .* GB of memory.* use fewer "
                                        r"clients \(-nc\) or a smaller model \(-m\)"):
    runner.run_experiment(config, log=lambda line: None)
  assert not (tmp_path / "out").exists()
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: one_run)
  runner.run_experiment(config, log=lambda line: None)
  assert (tmp_path / "out").exists()


def test_states_sharded_over_cpu_devices_share_the_machine(tmp_path):
  """On CPU the devices of one process are one machine's RAM: clients sharded over 8 fake
  devices need all their states there (an accelerator holds a shard each)."""
  from fedjax_lib import Config, runner  # pylint: disable=import-outside-toplevel
  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  engines = [runner.build(Config(algorithm="FedAvg", model="dnn", num_clients=8, devices=n,
                                 global_rounds=0, progress=False, out=str(tmp_path))).engine
             for n in (1, 8)]
  one, sharded = (memory.estimate_runs(e, 1) for e in engines)
  assert engines[1].num_shards == 8
  assert sharded.states == one.states > 0


def test_state_shapes_of_several_architectures_reuse_the_compatibility_traces(tmp_path):
  """`Engine.state_shapes` is what `_init_fn` makes, without tracing every architecture's
  init again (the compatibility check traced them while building: seconds for HtFE-img-8);
  the sequential executor's upload shapes are the check's too."""
  from fedjax_lib import Config, runner  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import rng  # pylint: disable=import-outside-toplevel
  engine = runner.build(Config(algorithm="LG-FedAvg", model="cnn,dnn", num_clients=4,
                               global_rounds=0, progress=False, out=str(tmp_path))).engine
  x = engine.data.x[0]
  traced = dict(engine._init_shapes)  # pylint: disable=protected-access
  assert len(traced) == 1 and len(next(iter(traced.values()))) == 2  # two groups, one shape
  expected = jax.eval_shape(engine._init_fn, {}, rng.root_key(0), x)  # pylint: disable=protected-access
  assert engine.state_shapes(x) == expected
  assert engine._group_init_shapes(x) is next(iter(traced.values()))  # pylint: disable=protected-access
  assert set(engine._step_shapes) == {(0, "round"), (1, "round")}  # pylint: disable=protected-access

"""PFLlib's remaining flags: learning-rate decay (``-ld``/``-ldg``), ``-pv``, ``-did``, ``-ml``,
the flags without effect (``-itk``, ``-ts``; ``-sfn`` with FedAvg) and the straggler flags
(``-tsr``/``-ssr``/``-tth``, accepted at PFLlib's defaults only).

The decay's reference: PFLlib's ``ExponentialLR(optimizer, γ)`` stepped once at the end of each
``train()`` call, so a client's (k+1)-th local training runs at lr·γ^k — here checked as (a) a
uniform factor f being exactly the learning rate lr·f, (b) a factor on one client moving only
that client's upload, by n_c/Σn times the update `train_locally` computes for it alone at the
decayed rate, and (c) the runner's counts against a hand count of the plans' selections.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib import Config, cli
from fedjax_lib.algorithms import algorithm_names, get_algorithm, make_algorithm
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import ClientData, LocalSpec, train_locally
from fedjax_lib.models import make_model
from fedjax_lib.runner import _Run, run_experiment
from tests.helpers import assert_cli_refuses
from tests.test_engine import _small_data


def _fedavg_engine(data, executor, lr=0.1, jr=1.0):
  model = make_model("mlr", data.sample_shape, data.num_classes)
  spec = LocalSpec(learning_rate=lr, batch_size=4, local_epochs=1,
                   steps_per_epoch=int(data.train_count.max()) // 4,
                   loop="scan" if executor == "vmap" else "valid")
  return engine_lib.Engine(make_algorithm("FedAvg", model, spec, {}),
                           engine_lib.DeviceData.from_federated(data),
                           engine_lib.Participation(data.num_clients, jr), executor=executor)


def _decay(factors, server=1.0):
  client = np.append(np.asarray(factors, np.float32), 1.0)
  return {engine_lib.LR_DECAY: {"client": jnp.asarray(client),
                                "server": jnp.asarray(server, jnp.float32)}}


def _one_round(eng, hparams=None):
  root = rng.root_key(0)
  server, clients = eng.init(root, eng.data.x[0])
  server, _, _ = eng.run_round(server, clients, root, 0, hparams=hparams)
  return jax.device_get(server)


@pytest.mark.parametrize("executor", ["vmap", "sequential"])
def test_a_uniform_decay_factor_is_the_learning_rate_times_it(executor):
  data = _small_data()
  n = data.num_clients
  decayed = _one_round(_fedavg_engine(data, executor, lr=0.1), _decay([0.5] * n))
  plain = _one_round(_fedavg_engine(data, executor, lr=0.05))
  undecayed = _one_round(_fedavg_engine(data, executor, lr=0.1), _decay([1.0] * n))
  reference = _one_round(_fedavg_engine(data, executor, lr=0.1))
  for a, b in zip(jax.tree.leaves(decayed), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(undecayed), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


def test_a_clients_factor_moves_only_its_own_update():
  """Factors 0 except client c: the server moves by n_c/Σn times c's own update, trained
  alone by `train_locally` at lr·f_c from the client key the engine derives for c."""
  data = _small_data()
  n, c, f = data.num_clients, 2, 0.25
  eng = _fedavg_engine(data, "sequential", lr=0.1)
  root = rng.root_key(0)
  server0, clients = eng.init(root, eng.data.x[0])
  factors = np.zeros(n)
  factors[c] = f
  server, _, _ = eng.run_round(jax.tree.map(jnp.copy, server0), clients, root, 0,
                               hparams=_decay(factors))
  alg = eng.algorithm.with_hyperparameter_values({"local.learning_rate": 0.1 * f})
  key = rng.client_key(rng.round_key(root, 0), c)
  own, _, _ = train_locally(server0["params"], ClientData(
      eng.data.x, eng.data.y, eng.data.train_idx[c], eng.data.train_count[c]), key, alg.local,
                            alg.ce_loss)
  counts = np.asarray(data.train_count[:n], np.float64)
  share = counts[c] / counts.sum()
  for got, start, mine in zip(jax.tree.leaves(server["params"]),
                              jax.tree.leaves(server0["params"]), jax.tree.leaves(own)):
    np.testing.assert_allclose(np.asarray(got) - start, share * (np.asarray(mine) - start),
                               rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(mine) - start).max() > 1e-4  # c did move


def test_executors_agree_on_per_client_factors():
  data = _small_data()
  factors = np.linspace(0.2, 1.0, data.num_clients)
  out = [_one_round(_fedavg_engine(data, ex, jr=jr), _decay(factors))
         for ex, jr in (("vmap", 1.0), ("sequential", 1.0))]
  uniform = _one_round(_fedavg_engine(data, "vmap"))
  for a, b, u in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1]), jax.tree.leaves(uniform)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert not np.allclose(a, u)


def test_runner_counts_each_clients_trainings():
  run = _Run.__new__(_Run)
  run.trained = np.zeros(4, np.int64)
  run.count_trained([0, 2, -1, -1])
  run.count_trained([2, 3, -1, -1])
  assert run.trained.tolist() == [1, 0, 2, 1]
  decay = run.lr_decay(0.5, 2)
  np.testing.assert_allclose(decay["client"], [0.5, 1.0, 0.25, 0.5, 1.0])
  assert float(decay["server"]) == 0.25
  run.trained = None
  assert run.lr_decay(0.5, 2) is None


def _quick(tmp_path, name, **changes):
  values = {"num_clients": 5, "global_rounds": 3, "model": "mlr", **changes}
  config = Config(out=str(tmp_path / name), progress=False, plot=False, **values)
  return run_experiment(config, quiet=True)


@pytest.mark.parametrize("algorithm", ["FedAvg", "Ditto", "pFedMe", "SCAFFOLD", "APFL", "GPFL"])
def test_gamma_one_changes_nothing_and_gamma_below_one_does(algorithm, tmp_path):
  kw = {"join_ratio": 0.6, "algorithm": algorithm, "global_rounds": 2}
  plain = _quick(tmp_path, "plain", **kw)
  one = _quick(tmp_path, "one", learning_rate_decay=True, learning_rate_decay_gamma=1.0, **kw)
  half = _quick(tmp_path, "half", learning_rate_decay=True, learning_rate_decay_gamma=0.5,
                **kw)
  # γ = 1 is the same training; the rate is then a runtime value instead of a constant XLA
  # folds, so the last bits may differ (pFedMe's inner steps: 3e-9 relative).
  np.testing.assert_allclose(one.runs[0].history["train_loss"],
                             plain.runs[0].history["train_loss"], rtol=1e-6)
  assert half.runs[0].history["train_loss"][0] == plain.runs[0].history["train_loss"][0]
  assert half.runs[0].history["train_loss"][1:] != plain.runs[0].history["train_loss"][1:]


def test_decay_resumes_exactly_from_a_checkpoint(tmp_path):
  """The per-client counts travel in the checkpoint: 3 rounds, then 3 more from it, equal
  6 rounds straight (partial participation, so the counts differ per client)."""
  kw = dict(join_ratio=0.6, learning_rate_decay=True, learning_rate_decay_gamma=0.7)
  straight = _quick(tmp_path, "straight", **{**kw, "global_rounds": 6})
  _quick(tmp_path, "resumed", checkpoint_every=1, **kw)
  resumed = _quick(tmp_path, "resumed", checkpoint_every=1, **{**kw, "global_rounds": 6})
  for key in ("test_acc", "train_loss"):
    assert resumed.runs[0].history[key] == straight.runs[0].history[key]


def test_every_algorithm_offering_decay_names_rates_it_has():
  """Each declared path is a hyperparameter of the algorithm (built with its defaults)."""
  model = make_model("mlr", (4,), 3)
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1, steps_per_epoch=1)
  offered = [name for name in algorithm_names()
             if get_algorithm(name).decayed_rates() is not None]
  assert "FedAvg" in offered
  for name in offered:
    cls = get_algorithm(name)
    paths = set(cls.decayed_rates()) | set(cls.SERVER_DECAYED_RATES)
    try:
      values = make_algorithm(name, model, spec, {}).hyperparameter_values()
    except Exception:  # pylint: disable=broad-except  (needs a generator, several models ...)
      values = {f"local.{k}": v for k, v in vars(spec).items()} | cls.hyperparameters()
    for path in paths:
      assert path in values, (name, path)
    if not isinstance(values.get("local.learning_rate"), float):
      continue  # built from the class's defaults above, not an instance
    alg = make_algorithm(name, model, spec, {})
    halved = alg.with_decayed_rates(0.5).hyperparameter_values()
    for path, value in values.items():
      want = value * 0.5 if path in cls.decayed_rates() else value
      assert halved[path] == want or (value is None and halved[path] is None), (name, path)


# ------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("argv,words", [
    (["-ld", "1", "-algo", "FedBABU"], ["learning_rate_decay", "FedBABU", "FedAvg"]),
    (["-ld", "1", "-algo", "FedProto", "-m", "dnn"], ["learning_rate_decay", "FedProto"]),
    (["-ld", "1", "-dlg", "1"], ["learning_rate_decay", "dlg_eval"]),
    (["-ldg", "0"], ["learning_rate_decay_gamma=0.0", "> 0"]),
    (["-pv", "1"], ["prev=1", "times=1", "0 <= prev < times"]),
    (["-pv", "-1", "-t", "2"], ["prev=-1", ">= 0"]),
    (["-did", "gpu0"], ["-did 'gpu0'", "comma-separated integers"]),
    (["-dev", "cuda"], ["-dev cuda", "cannot start"]),
    (["-tsr", "0.1"], ["-tsr 0.1", "not reproduced", "accepted: 0"]),
    (["-ssr", "0.5"], ["-ssr 0.5", "accepted: 0"]),
    (["-tth", "5"], ["-tth 5", "accepted: 10000"]),
    (["-ml", "0"], ["max_len=0", ">= 1"]),
])
def test_bad_pfllib_flags_exit_2_with_one_line(argv, words, tmp_path, capsys):
  if argv[:2] == ["-dev", "cuda"] and any(d.platform == "gpu" for d in jax.devices()):
    pytest.skip("this machine has a GPU")
  assert_cli_refuses(argv, words, tmp_path, capsys)


def test_pfllibs_quick_start_flags_and_no_effect_flags_run(tmp_path, capsys):
  """PFLlib's README command line (``-did 0``) and the flags PFLlib never reads run, each of
  the latter with a warning; the defaults of the straggler flags are accepted."""
  out = tmp_path / "out"
  code = cli.main(["-m", "mlr", "-algo", "FedAvg", "-gr", "1", "-did", "0", "-nc", "4",
                   "-itk", "4000", "-ts", "1", "-sfn", "items", "-tsr", "0", "-ssr", "0",
                   "-tth", "10000", "--out", str(out), "--no-progress", "--no-plot"])
  printed = capsys.readouterr().out
  assert code == 0
  for flag in ("-itk 4000", "-ts True"):
    assert f"warning: {flag} has no effect" in printed, printed
  assert "warning: save_folder_name='items' (-sfn) writes nothing with FedAvg" in printed
  assert os.path.exists(out / "digits_FedAvg_test_0.json")


def test_prev_continues_a_series_with_its_seeds_and_file_numbers(tmp_path):
  """``-t 3`` then ``-pv 3 -t 5`` (PFLlib's ``range(prev, times)``): runs 3 and 4, seeds
  seed+3 and seed+4, files ``_3`` and ``_4``; run 3 equals run 3 of ``-t 4``."""
  series = _quick(tmp_path, "series", prev=3, times=5, global_rounds=1)
  names = sorted(os.listdir(tmp_path / "series"))
  assert [n for n in names if n.endswith(".json") and "partition" not in n] == [
      "digits_FedAvg_test_3.json", "digits_FedAvg_test_4.json"]
  assert [r.seed for r in series.runs] == [3, 4]
  with open(tmp_path / "series" / "digits_FedAvg_test_3.json", encoding="utf-8") as f:
    assert json.load(f)["run"] == 3
  whole = _quick(tmp_path, "whole", times=4, global_rounds=1)
  assert series.runs[0].history["test_acc"] == whole.runs[3].history["test_acc"]


def test_decay_where_pfllib_decays_nothing_warns(tmp_path, capsys):
  code = cli.main(["-m", "mlr", "-gr", "1", "-nc", "4", "-algo", "FedCP", "-ld", "1",
                   "--out", str(tmp_path / "o"), "--no-progress", "--no-plot"])
  assert code == 0
  assert "learning_rate_decay (-ld) has no effect with FedCP" in capsys.readouterr().out


def test_max_len_is_checked_against_text_data_only(tmp_path, capsys):
  code = cli.main(["-m", "mlr", "-gr", "1", "-nc", "4", "-ml", "200", "--out",
                   str(tmp_path / "o"), "--no-progress", "--no-plot"])
  assert code == 0
  assert "max_len=200 (-ml) has no effect" in capsys.readouterr().out


def test_readme_decay_table_matches_the_algorithms():
  """Every algorithm stands in exactly one row of the README's -ld table, the row of what
  it declares (client rates, server rates): -lr; pFedMe's -lrp; -lr and FedGen-PFLlib's
  generator; nothing (accepted, warned); refused (two rows)."""
  import re  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
  with open(path, encoding="utf-8") as f:
    section = f.read().split("## Learning-rate decay (-ld, -ldg)")[1].split("\n## ")[0]
  rows = [line.split("|")[1] for line in section.splitlines()
          if line.startswith("| ") and not line.startswith("| algorithms")]
  lr = ("local.learning_rate",)
  expected = [(lr, ()), (("p_learning_rate",), ()), (lr, ("generator_learning_rate",)),
              ((), ()), (None, ()), (None, ())]
  assert len(rows) == len(expected)
  for name in algorithm_names():
    found = [i for i, row in enumerate(rows)
             if re.search(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])", row)]
    assert len(found) == 1, (name, found)
    cls = get_algorithm(name)
    assert (cls.decayed_rates(), cls.SERVER_DECAYED_RATES) == expected[found[0]], name


@pytest.mark.parametrize("compat", [False, True])
def test_scaffolds_control_divides_by_the_rate_stepped_with(compat):
  """Option II with -ld: c_i⁺ = c_i − c + (x − y)/(K·lr·γ^k); PFLlib (``pfllib_compat``)
  divides by the undecayed lr while stepping at the decayed one."""
  from fedjax_lib.algorithms.scaffold import updated_control  # pylint: disable=C0415
  data = _small_data()
  model = make_model("mlr", data.sample_shape, data.num_classes)
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1,
                   steps_per_epoch=int(data.train_count.max()) // 4)
  alg = make_algorithm("SCAFFOLD", model, spec, {"pfllib_compat": compat})
  server, clients = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
  r = np.random.default_rng(0)
  server["control"] = jax.tree.map(lambda a: jnp.asarray(r.normal(size=a.shape), a.dtype),
                                   server["control"])
  client = jax.tree.map(lambda a: a[1], clients)
  cdata = ClientData(jnp.asarray(data.x), jnp.asarray(data.y), jnp.asarray(data.train_idx[1]),
                     jnp.asarray(data.train_count[1]))
  decayed = alg.with_decayed_rates(0.5)
  assert decayed.local.learning_rate == pytest.approx(0.05) and alg.local.learning_rate == 0.1
  new_state, upload, stats = decayed.client_update(server, client, cdata, rng.root_key(1))
  y = jax.tree.map(lambda a, d: a + d, server["params"], upload["delta_params"])
  want = updated_control(client["control"], server["control"], server["params"], y,
                         stats["steps"], 0.1 if compat else 0.05)
  for a, b in zip(jax.tree.leaves(new_state["control"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  steps_at = decayed.client_update(server, client, cdata, rng.root_key(1))[1]["delta_params"]
  plain = alg.with_hyperparameter_values({"local.learning_rate": 0.05}).client_update(
      server, client, cdata, rng.root_key(1))[1]["delta_params"]
  for a, b in zip(jax.tree.leaves(steps_at), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)  # the steps themselves run at lr·γ^k either way


def test_apfls_alpha_step_keeps_the_undecayed_rate():
  """PFLlib's α update reads ``self.learning_rate`` (never decayed) while w and v step at the
  decayed rate: α − lr·(g_α + 0.02·α), clipped, against the decayed w/v steps."""
  from fedjax_lib.algorithms.apfl import ALPHA_DECAY, apfl_sgd  # pylint: disable=C0415
  params = {"global": jnp.ones(3), "personal": jnp.zeros(3), "alpha": jnp.float32(0.5)}
  grads = {"global": jnp.full(3, 2.0), "personal": jnp.full(3, -1.0), "alpha": jnp.float32(0.3)}
  updates, _ = apfl_sgd(0.05, False, 0.1).update(grads, optax_empty(), params)
  np.testing.assert_allclose(updates["global"], -0.05 * 2.0)
  np.testing.assert_allclose(updates["personal"], 0.05)
  np.testing.assert_allclose(updates["alpha"], -0.1 * (0.3 + ALPHA_DECAY * 0.5), rtol=1e-6)
  model = make_model("mlr", (4,), 3)
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1, steps_per_epoch=1)
  decayed = make_algorithm("APFL", model, spec, {}).with_decayed_rates(0.5)
  assert decayed.local.learning_rate == pytest.approx(0.05)
  assert decayed.undecayed("local.learning_rate") == 0.1
  assert decayed.with_decayed_rates(0.5).undecayed("local.learning_rate") == 0.1


def optax_empty():
  import optax  # pylint: disable=import-outside-toplevel
  return optax.EmptyState()


def test_sgd_by_part_steps_each_part_at_its_rate():
  """Equal rates: optax.sgd's steps to the bit; otherwise each part at its own rate (GPFL's
  GCE/CoV and FedDBE's PRBM keep the undecayed rate under -ld, as PFLlib's optimizers
  without a scheduler)."""
  import optax  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core.local import sgd_by_part  # pylint: disable=import-outside-toplevel
  r = np.random.default_rng(0)
  grads = {"params": {"w": jnp.asarray(r.normal(size=(3, 2)), jnp.float32)},
           "bias": jnp.asarray(r.normal(size=(2,)), jnp.float32)}
  same, _ = sgd_by_part(0.1, {"bias": 0.1}).update(grads, optax.EmptyState())
  plain, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(grads))
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)
  mixed, _ = sgd_by_part(0.05, {"bias": 0.1}).update(grads, optax.EmptyState())
  np.testing.assert_allclose(mixed["params"]["w"], -0.05 * grads["params"]["w"])
  np.testing.assert_allclose(mixed["bias"], -0.1 * grads["bias"])


def test_feddbe_counts_its_start_up_training_as_the_first_step(tmp_path):
  """PFLlib's FedDBE start-up period calls every client's train() once before round 0, which
  steps the scheduler: round 0 already trains at lr·γ."""
  from fedjax_lib.algorithms.dbe import FedDBE  # pylint: disable=import-outside-toplevel
  assert FedDBE.LR_DECAY_START == 1 and get_algorithm("FedAvg").LR_DECAY_START == 0
  kw = {"algorithm": "FedDBE", "model": "dnn", "global_rounds": 1}
  plain = _quick(tmp_path, "plain", **kw)
  half = _quick(tmp_path, "half", learning_rate_decay=True, learning_rate_decay_gamma=0.5, **kw)
  halved_lr = _quick(tmp_path, "lr", learning_rate=0.0025, **kw)
  assert half.runs[0].history["train_loss"] != plain.runs[0].history["train_loss"]
  # round 0's model steps at lr/2 (only the PRBM differs from a run at lr/2, which a DNN's
  # PRBM barely moves in one round): closer to the halved-lr run than to the plain one.
  gap = lambda a, b: abs(a.runs[0].history["train_loss"][1] - b.runs[0].history["train_loss"][1])
  assert gap(half, halved_lr) < gap(half, plain)


def test_decay_in_a_stacked_sweep_equals_the_single_runs(tmp_path):
  """Runs stacked in one vmapped program (a seed sweep, vmap executor) get each their own
  factors: every combination equals its run alone."""
  kw = dict(executor="vmap", join_ratio=0.6, learning_rate_decay=True,
            learning_rate_decay_gamma=0.5, global_rounds=2, partition_seed=0)
  swept = _quick(tmp_path, "sweep", sweep={"seed": [0, 1]}, **kw)
  for s in (0, 1):
    alone = _quick(tmp_path, f"alone{s}", seed=s, **kw)
    np.testing.assert_allclose(swept.runs[s].history["train_loss"],
                               alone.runs[0].history["train_loss"], rtol=2e-5)

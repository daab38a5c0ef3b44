"""Settings that are accepted one by one but together waste a run: refused, or warned about.

`Config.validate` checks each field alone. Some valid values still leave most clients untrained
or nothing evaluated once the data, the model and the algorithm are known: a batch size only a
few clients can fill (training drops the last partial batch), an evaluation gap that skips the
trained rounds, a FedALA ``layer_idx`` beyond the model's tensors. :func:`check_settings`
runs in `fedjax_lib.runner.build`, after the data, models, algorithm and engine exist and before
anything is written, and applies one rule:

- **refuse** (`~fedjax_lib.errors.ConfigError`, one line naming the value and what is accepted)
  a setting that cannot work: nothing would be trained or evaluated, or the algorithm would
  silently be another one, or differential privacy (``-dp``) for an algorithm or a model that
  DP-SGD does not make private (`fedjax_lib.privacy`), or the DLG attack (``-dlg``) for an
  algorithm that does not upload its whole model (`fedjax_lib.dlg`);
- **warn** (one line, with the numbers and what to do) about a setting that works badly:
  clients that never train or are never tested, flags that have no effect, training that is
  never evaluated.

Algorithm hyperparameters are checked by the algorithm itself
(`fedjax_lib.algorithms.base.Algorithm.check_settings`), once per architecture. Everything
here reads counts and shapes only (``jax.eval_shape``); nothing is compiled. The README's
"Settings that are refused or warned about" lists every rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from fedjax_lib import algorithms as algorithms_lib
from fedjax_lib import client_models as client_models_lib
from fedjax_lib import dlg as dlg_lib
from fedjax_lib import models as models_lib
from fedjax_lib import privacy as privacy_lib
from fedjax_lib.algorithms.base import SettingsContext, has_hook
from fedjax_lib.config import Config
from fedjax_lib.data.loading import is_folder_path
from fedjax_lib.data.quantized import QuantizedImages
from fedjax_lib.errors import ConfigError

# Partition settings and the schemes that read them (`fedjax_lib.data.partition`).
PARTITION_SETTINGS = {"alpha": ("dir", "exdir"), "class_per_client": ("pat", "exdir"),
                      "balance": ("iid", "pat")}


def check_settings(config: Config, data, num_clients: int, algorithm,
                   models: dict) -> list[str]:
  """Refuses settings that cannot work; returns warnings about settings that work badly.

  Args:
    config: the validated config.
    data: the `FederatedData` (``num_clients`` training clients, then the new clients).
    num_clients: the number of training clients N.
    algorithm: the algorithm instance (its ``model`` is the first architecture's).
    models: architecture name → Flax model, in the order of first use in ``config.model``.

  Returns:
    One-line warnings without a ``warning:`` prefix, each naming the setting, its value and
    the numbers, and what to do; repeated messages appear once.

  Raises:
    ConfigError: for a setting that cannot work (see the module docstring).
  """
  sample_x = data.x[0]
  warnings = (_rounds(config, algorithm) + _clients(config, data, num_clients)
              + _participation(config, num_clients, algorithm, sample_x)
              + _new_clients(config, data, num_clients, algorithm)
              + _ignored(config, algorithm, models)
              + _feature_dim(config, data, models)
              + _vocabulary(config, data, models)
              + _max_len(config, data, models)
              + _lr_decay(config, algorithm)
              + _client_models(config, algorithm)
              + privacy_lib.check(config, np.asarray(data.train_count[:num_clients]),
                                  algorithm, models, sample_x)
              + dlg_lib.check(config, data, algorithm, models)
              + _algorithm(config, data, num_clients, algorithm, models))
  return list(dict.fromkeys(warnings))


def _rounds(config: Config, algorithm) -> list[str]:
  """Evaluation gap, auto-break patience, checkpoint interval and the algorithm's first
  evaluated round against the round count."""
  rounds, gap = config.global_rounds, config.eval_gap
  out = []
  first = algorithm.first_evaluated_round()
  # The first evaluated round, computed: a list of all of them took O(rounds) memory, and
  # -gr 2147483647 filled it.
  first_evaluated = -(-first // gap) * gap
  if first and first_evaluated > rounds:
    raise ConfigError(
        f"{algorithm.name} hyperparameter warmup_rounds={first}: the run has global_rounds="
        f"{rounds} and evaluates nothing before round {first} (its warm-up), so no round "
        f"would be evaluated; use warmup_rounds <= {rounds - rounds % gap} (-wu) or more "
        "rounds")
  if rounds >= 1 and gap > rounds:
    raise ConfigError(f"eval_gap={gap} is larger than global_rounds={rounds}: only round 0, the "
                      f"untrained model, would be evaluated; use eval_gap <= {rounds}")
  if rounds % gap:
    last = rounds - rounds % gap
    skipped = f"round {last}" if rounds % gap == 1 else f"rounds {last}..{rounds - 1}"
    out.append(f"global_rounds={rounds} is not a multiple of eval_gap={gap}: the last "
               f"evaluation is at round {last}, so the training of {skipped} is never "
               f"evaluated; use global_rounds={last} or {last + gap}")
  if config.auto_break and rounds >= gap:
    evaluations = rounds // gap + 1
    if rounds // gap <= config.top_cnt:
      advice = (f"use top_cnt <= {rounds // gap - 1}" if rounds // gap >= 2
                else "drop auto_break")
      out.append(f"auto_break with top_cnt={config.top_cnt} can never stop this run: it has "
                 f"{evaluations} evaluations (global_rounds={rounds}, eval_gap={gap}) and stops "
                 f"only when the best is more than top_cnt evaluations old; {advice}")
  if config.checkpoint_every > rounds >= 1:
    out.append(f"checkpoint_every={config.checkpoint_every} is larger than global_rounds="
               f"{rounds}: no checkpoint is written during the run, only at its end (and on "
               f"Ctrl-C); use checkpoint_every <= {rounds}")
  return out


def _clients(config: Config, data, num_clients: int) -> list[str]:
  """Training clients that never take a step; clients, or all of them, without test data."""
  train = np.asarray(data.train_count[:num_clients], np.int64)
  test = np.asarray(data.test_count[:num_clients], np.int64)
  batch = config.batch_size
  fewer = "fewer clients (num_clients)" if not is_folder_path(config.dataset) else None
  if not test.any():
    raise ConfigError(f"dataset {config.dataset!r}: none of the {num_clients} training clients "
                      "has a test sample, so every evaluation would report accuracy 0; use a "
                      "dataset whose clients have test splits")
  if not train.any():
    raise ConfigError(f"dataset {config.dataset!r}: none of the {num_clients} training clients "
                      "has a training sample, so nothing would be trained; use a dataset whose "
                      "clients have training data")
  if (train < batch).all():
    raise ConfigError(f"batch_size={batch} is larger than every training client's training set "
                      f"(the largest has {int(train.max())} samples; training drops the last "
                      f"partial batch); use batch_size <= {int(train.max())}")
  out = []
  empty, small = int((train == 0).sum()), int(((train > 0) & (train < batch)).sum())
  if empty or small:
    parts = ([f"{empty} have no training sample"] if empty else []) + (
        [f"{small} have fewer than batch_size={batch} (training drops the last partial "
         "batch, as PFLlib)"] if small else [])
    advice = " or ".join(([fewer] if empty and fewer else [])
                         + (["a smaller batch_size"] if small else [])) or "other data"
    out.append(f"{empty + small} of {num_clients} clients never take a training step: "
               f"{' and '.join(parts)}; use {advice}")
  untested = int((test == 0).sum())
  if untested:
    out.append(f"{untested} of {num_clients} clients have no test sample: they are never "
               f"evaluated, and the reported accuracy covers only the other "
               f"{num_clients - untested}" + (f"; use {fewer}" if fewer else ""))
  return out


def _participation(config: Config, num_clients: int, algorithm, sample_x) -> list[str]:
  """Selection flags with no effect, and selections that leave clients never trained."""
  out = []
  ratio, rounds = config.join_ratio, config.global_rounds
  if config.random_join_ratio and ratio == 1:
    out.append(f"random_join_ratio has no effect with join_ratio={ratio}: every round selects "
               f"all {num_clients} clients; set join_ratio < 1 for a random count in "
               "[int(N·join_ratio), N]")
  selected = int(num_clients * ratio)
  if not config.random_join_ratio and rounds >= 1 and rounds * selected < num_clients:
    out.append(f"join_ratio={ratio} selects {selected} of {num_clients} clients per round: "
               f"the {rounds} evaluated round(s) train at most {rounds * selected} clients, so "
               f"at least {num_clients - rounds * selected} never train; use join_ratio >= "
               f"{math.ceil(num_clients / rounds) / num_clients:.3g} or more rounds")
  if config.client_drop_rate:
    server, _ = jax.eval_shape(lambda x: algorithm.init(jax.random.PRNGKey(0), x, 1),
                               jax.ShapeDtypeStruct(np.shape(sample_x), sample_x.dtype))
    if not jax.tree.leaves(server):
      out.append(f"client_drop_rate={config.client_drop_rate} has no effect with "
                 f"{algorithm.name}: nothing is aggregated, and a dropped client keeps its "
                 "training (as in PFLlib); use client_drop_rate=0")
  return out


def _new_clients(config: Config, data, num_clients: int, algorithm) -> list[str]:
  """New-client evaluation: fine-tuning epochs without new clients, new clients that cannot
  be tested or fine-tuned."""
  epochs, batch = config.fine_tuning_epoch_new, config.batch_size
  new = data.num_clients - num_clients
  if not new:
    if not epochs:
      return []
    own = ("; the fine-tuning after the last round is fine_tuning_epochs (-fte)"
           if "fine_tuning_epochs" in algorithm.hyperparameters() else "")
    return [f"fine_tuning_epoch_new={epochs} has no effect without new clients "
            f"(num_new_clients=0){own}; set num_new_clients (-nnc) to evaluate new clients"]
  train = np.asarray(data.train_count[num_clients:], np.int64)
  test = np.asarray(data.test_count[num_clients:], np.int64)
  if not test.any():
    raise ConfigError(f"num_new_clients={new}: none of the {new} new clients has a test "
                      "sample, so new-client evaluation would report accuracy 0; use fewer "
                      "new clients or a dataset whose clients have test splits")
  out = []
  if (test == 0).any():
    out.append(f"{int((test == 0).sum())} of the {new} new clients (num_new_clients={new}) have "
               "no test sample; the new-client accuracy covers only the others")
  if epochs and (train < batch).any():
    out.append(f"{int((train < batch).sum())} of the {new} new clients have fewer than "
               f"batch_size={batch} training samples and are not fine-tuned "
               f"(fine_tuning_epoch_new={epochs}; training drops the last partial batch)")
  return out


def _ignored(config: Config, algorithm, models: dict) -> list[str]:
  """Flags that the chosen dataset or algorithm does not read."""
  out = []
  # --pfllib-compat also gives the models their references' log-softmax features where the
  # reference splits them (`fedjax_lib.runner.log_softmax_quirk`): then it has an effect.
  quirk = any(getattr(getattr(m, "base", None), "log_softmax_features", False)
              for m in models.values())
  if (config.pfllib_compat and "pfllib_compat" not in algorithm.hyperparameters()
      and not quirk):
    offering = [name for name in algorithms_lib.algorithm_names()
                if "pfllib_compat" in algorithms_lib.get_algorithm(name).hyperparameters()]
    out.append(f"pfllib_compat=True has no effect with {algorithm.name}: only "
               f"{', '.join(offering)} {'offers' if len(offering) == 1 else 'offer'} a "
               "PFLlib-compatibility mode")
  defaults = Config()
  changed = lambda name: getattr(config, name) != getattr(defaults, name)
  if is_folder_path(config.dataset):
    # (Not partition_seed: a sweep sets it to the seed, whatever the dataset.)
    names = [n for n in ("partition", "train_ratio", *PARTITION_SETTINGS) if changed(n)]
    if names:
      out.append(f"dataset {config.dataset!r} is a folder, already partitioned: "
                 f"{', '.join(f'{n}={getattr(config, n)!r}' for n in names)} "
                 f"{'is' if len(names) == 1 else 'are'} ignored")
  else:
    for name, schemes in PARTITION_SETTINGS.items():
      if changed(name) and config.partition not in schemes:
        out.append(f"{name}={getattr(config, name)!r} has no effect with partition="
                   f"{config.partition!r}; only {' and '.join(schemes)} read it")
  return out


def _feature_dim(config: Config, data, models: dict) -> list[str]:
  """A given ``feature_dim`` wider than an architecture's own features."""
  if config.feature_dim is None:
    return []
  out = []
  for arch, model in models.items():
    width = models_lib.feature_dim(model.clone(feature_dim=None), data.sample_shape)
    if config.feature_dim > width:
      out.append(f"feature_dim={config.feature_dim} is larger than the {arch} model's "
                 f"{width} features: pooling repeats each feature about "
                 f"{config.feature_dim / width:.1f} times, which adds no information, only "
                 f"head parameters (and scales the head's effective learning rate); use "
                 f"feature_dim <= {width}")
  return out


def _vocabulary(config: Config, data, models: dict) -> list[str]:
  """Refuses token ids at or above a text model's vocabulary (``-vs``): they would look up
  NaN embeddings (`fedjax_lib.models.text`) and stop the run at its first update."""
  vocabularies = {arch: getattr(model.base, "vocab_size", None) for arch, model in models.items()}
  vocabularies = {arch: v for arch, v in vocabularies.items() if v is not None}
  if not vocabularies or isinstance(data.x, QuantizedImages) or not len(data.x):
    return []
  top = int(np.max(np.asarray(data.x)))
  for arch, vocab in vocabularies.items():
    if top >= vocab:
      given = f"-vs {config.vocab_size}" if config.vocab_size else "-vs not given"
      raise ConfigError(
          f"the data holds token ids up to {top}, but model {arch!r} has a vocabulary of "
          f"{vocab} ({given}); use -vs {top + 1} or more (PFLlib: -vs 32000 for AG News and "
          "Sogou News, 80 for Shakespeare)")
  return []


def _lr_decay(config: Config, algorithm) -> list[str]:
  """PFLlib's ``-ld``: refused where the reference decays nothing (its client never steps a
  scheduler, or HtFLlib, which parses -ld and never reads it) and with the DLG attack (which
  replays a client's training at the given rate); ``-ldg`` alone does nothing."""
  if not config.learning_rate_decay:
    if config.learning_rate_decay_gamma != Config().learning_rate_decay_gamma:
      return [f"learning_rate_decay_gamma={config.learning_rate_decay_gamma:g} (-ldg) has no "
              "effect without learning_rate_decay (-ld 1)"]
    return []
  cls = type(algorithm)
  if cls.decayed_rates() is None:
    takers = [name for name in algorithms_lib.algorithm_names()
              if algorithms_lib.get_algorithm(name).decayed_rates() is not None]
    raise ConfigError(f"learning_rate_decay (-ld) is not offered by {algorithm.name} (the "
                      "README's \"Learning-rate decay\" says why); offered by "
                      f"{', '.join(takers)}")
  if config.dlg_eval:
    raise ConfigError("learning_rate_decay (-ld) with dlg_eval (-dlg): the attack replays a "
                      "client's training at the undecayed rate; use one of them")
  if not cls.decayed_rates() and not cls.SERVER_DECAYED_RATES:
    return [f"learning_rate_decay (-ld) has no effect with {algorithm.name}: PFLlib's client "
            "never trains with the optimizer its scheduler decays (the README's \"Learning-rate "
            "decay\" says how)"]
  return []


def model_savers() -> list[str]:
  """The algorithms whose clients keep their own model (the ``client_model`` hook): those
  ``-sfn`` writes and ``-mfn`` loads."""
  return [name for name in algorithms_lib.algorithm_names()
          if has_hook(algorithms_lib.get_algorithm(name), "client_model")]


def _client_models(config: Config, algorithm) -> list[str]:
  """HtFLlib's ``-mfn`` (refused by an algorithm without per-client model files: no
  ``client_model`` hook) and ``-sfn`` (warned about where it writes nothing). Such an
  algorithm may well keep per-client state (Ditto's personal models, FedPer's heads): it is
  in the run's checkpoints, not in HtFLlib's model files."""
  saves = has_hook(algorithm, "client_model")
  if config.models_folder_name and not saves:
    raise ConfigError(
        f"models_folder_name (-mfn) starts each client from its saved model (HtFLlib's "
        f"per-client model files), which {algorithm.name} has none of: its clients' state "
        f"is kept in the run's checkpoints (--checkpoint-every, --resume); algorithms that "
        f"take -mfn: {', '.join(model_savers())}")
  if not config.save_folder_name:
    return []
  if not saves:
    return [f"save_folder_name={config.save_folder_name!r} (-sfn) writes nothing with "
            f"{algorithm.name}, which has no per-client model files (HtFLlib's; its clients' "
            f"state is kept in the run's checkpoints: --checkpoint-every); -sfn writes the "
            f"client models of {', '.join(model_savers())}"]
  if not client_models_lib.kept(config.save_folder_name):
    return [f"save_folder_name={config.save_folder_name!r} (-sfn) writes nothing: HtFLlib "
            "deletes a folder whose name contains 'temp' when the run ends; give another "
            "name to keep the client models"]
  return []


def _max_len(config: Config, data, models: dict) -> list[str]:
  """PFLlib's ``-ml``: the text models are built for the data's sequence length, so a given
  ``max_len`` must equal it (PFLlib's TextCNN pools over exactly ``max_len`` positions and
  fails on any other length); other data do not read it."""
  if config.max_len is None:
    return []
  text = any(getattr(model.base, "vocab_size", None) is not None for model in models.values())
  if not text:
    return [f"max_len={config.max_len} (-ml) has no effect: only the text models read it"]
  length = int(data.sample_shape[0])
  if config.max_len != length:
    raise ConfigError(f"max_len={config.max_len} (-ml) does not match the data's token "
                      f"sequences of length {length}; use -ml {length} or leave it unset (the "
                      "text models take the data's length; PFLlib's generators write 200)")
  return []


def _algorithm(config: Config, data, num_clients: int, algorithm, models: dict) -> list[str]:
  """The algorithm's own checks, once per architecture (`Algorithm.check_settings`).

  With several architectures a message every architecture gives appears once; the others are
  prefixed with ``model <name>:``, and so are refusals.
  """
  architectures = models_lib.dataset_architectures(config.model, config.dataset)
  k = len(architectures)
  per_arch: dict[str, list[str]] = {}
  for arch, model in models.items():
    ids = [i for i in range(num_clients) if architectures[i % k] == arch]
    if not ids:
      continue
    new = sum(architectures[i % k] == arch for i in range(num_clients, data.num_clients))
    context = SettingsContext(model_name=arch, sample_x=data.x[0],
                              train_counts=np.asarray(data.train_count)[ids],
                              num_new_clients=new,
                              fine_tuning_epoch_new=config.fine_tuning_epoch_new)
    instance = _with_model(algorithm, model)
    try:
      per_arch[arch] = instance.check_settings(context)
    except ConfigError as e:
      if len(models) == 1:
        raise
      raise ConfigError(f"model {arch}: {e}") from None
  if len(per_arch) <= 1:
    return [m for messages in per_arch.values() for m in messages]
  common = [m for m in next(iter(per_arch.values()))
            if all(m in messages for messages in per_arch.values())]
  return common + [f"model {arch}: {m}" for arch, messages in per_arch.items()
                   for m in messages if m not in common]


def _with_model(algorithm, model) -> Any:
  return algorithm if algorithm.model is model else dataclasses.replace(algorithm, model=model)

"""CLI: PFLlib flag parsing, bad-input errors (exit 2, one line, no files), results files."""

import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fedjax_lib import cli
from fedjax_lib.config import Config
from fedjax_lib.data import load_federated, write_pfllib_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv):
  return cli.config_from_args(cli.build_parser().parse_args(argv))


def test_pfllib_short_flags_map_to_config():
  c = parse("-data digits -m DNN -algo local -gr 7 -ls 2 -lbs 16 -lr 0.01 -nc 10 -ncl 10 "
            "-jr 0.5 -rjr 1 -cdr 0.1 -eg 2 -t 3 -ab true -tc 5 -go exp --seed 4 "
            "--out /tmp/x".split())
  assert c == Config(dataset="digits", model="DNN", algorithm="local", global_rounds=7,
                     local_epochs=2, batch_size=16, learning_rate=0.01, num_clients=10,
                     num_classes=10, join_ratio=0.5, random_join_ratio=True,
                     client_drop_rate=0.1, eval_gap=2, times=3, auto_break=True, top_cnt=5,
                     goal="exp", seed=4, out="/tmp/x")


def test_long_options_and_pfllib_long_names():
  a = parse(["--learning-rate", "0.1", "--global-rounds", "3", "--batch-size", "5"])
  b = parse(["--local_learning_rate", "0.1", "--global_rounds", "3", "--batch_size", "5"])
  assert a == b and a.learning_rate == 0.1 and a.global_rounds == 3 and a.batch_size == 5


@pytest.mark.parametrize("text,value", [("0", False), ("1", True), ("False", False),
                                        ("false", False), ("True", True), ("yes", True)])
def test_boolean_flags_parse_false_correctly(text, value):
  assert parse(["-ab", text]).auto_break is value
  assert parse(["-rjr", text]).random_join_ratio is value


def test_shuffle_flag_reaches_the_local_spec():
  """--shuffle false (HtFLlib's unshuffled loader) becomes Config(shuffle=False) and the
  runner's LocalSpec; the default reshuffles."""
  import types  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models import make_model  # pylint: disable=import-outside-toplevel
  from fedjax_lib.runner import make_algorithm  # pylint: disable=import-outside-toplevel
  assert parse([]).shuffle is True and parse(["--shuffle"]).shuffle is True
  config = parse(["--shuffle", "false"])
  assert config.shuffle is False
  data = types.SimpleNamespace(train_count=np.array([40]), sample_shape=(12,), num_classes=3)
  model = make_model("mlr", (12,), 3)
  assert make_algorithm(config, data, model).local.shuffle is False
  assert make_algorithm(parse([]), data, model).local.shuffle is True


def test_algo_params_flag():
  assert parse(["--algo-param", "mu=0.01", "--algo-param", "k=3"]).algo_params == {
      "mu": 0.01, "k": 3}


def test_pfllib_algorithm_flags_become_algo_params():
  assert parse(["-algo", "Ditto", "-mu", "0.1", "-pls", "2"]).algo_params == {
      "mu": 0.1, "plocal_epochs": 2}
  assert parse(["-algo", "FedAvg"]).algo_params == {}


def run_cli(argv, tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "fedjax_lib", *argv, "--out", str(out),
                         "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                        timeout=300, check=False)
  return proc, out


@pytest.fixture(scope="module")
def pfllib_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("pfl") / "digits5"
  data = load_federated("digits", num_clients=5, seed=0, scheme="iid")
  write_pfllib_folder(data, str(folder))
  return folder


BAD_INPUTS = [
    (["-algo", "FedAvgg"], ["FedAvgg", "FedAvg", "Local"]),
    (["-m", "resnet7"], ["resnet7", "cnn"]),
    (["-data", "imagenet22k"], ["imagenet22k", "digits"]),
    (["-data", "/nonexistent/folder"], ["/nonexistent/folder"]),
    (["-lr", "0"], ["learning_rate", "0"]),
    (["-lr", "-0.1"], ["learning_rate", "-0.1"]),
    (["-lbs", "0"], ["batch_size", "0"]),
    (["-lbs", "-3"], ["batch_size", "-3"]),
    (["-jr", "0.01"], ["join_ratio", "0.01"]),
    (["-ncl", "5"], ["num_classes", "5"]),
    (["-gr", "abc"], ["abc"]),
    (["-ab", "maybe"], ["maybe"]),
    (["--executor", "threads"], ["threads"]),
    (["-cdr", "0.99", "-jr", "0.1"], ["client_drop_rate"]),
    (["-lbs", "5000"], ["batch_size", "5000"]),
    (["-algo", "FedAvg", "-mu", "0.1"], ["FedAvg", "mu"]),
    (["-algo", "FedProx", "-mu", "-1"], ["mu", "-1"]),
]


@pytest.mark.parametrize("argv,words", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_no_files(argv, words, capsys, tmp_path):
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as exc:
    sys.exit(cli.main(argv + ["--out", str(out), "--no-progress"]))
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, err
  for word in words:
    assert word in lines[0], (word, lines[0])
  assert not out.exists() or not any(out.iterdir())


def test_malformed_folder_and_class_mismatch(pfllib_folder, tmp_path, capsys):
  broken = tmp_path / "broken"
  (broken / "train").mkdir(parents=True)
  (broken / "train" / "0.npz").write_bytes(b"not an npz")
  (broken / "test").mkdir()
  (broken / "test" / "0.npz").write_bytes(b"not an npz")
  for argv in (["-data", str(broken)], ["-data", str(pfllib_folder), "-ncl", "3"],
               ["-data", str(pfllib_folder), "-nc", "7"]):
    with pytest.raises(SystemExit) as exc:
      sys.exit(cli.main(argv + ["--out", str(tmp_path / "o"), "--no-progress"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
  assert not (tmp_path / "o").exists()


def test_end_to_end_cli_writes_results(pfllib_folder, tmp_path):
  proc, out = run_cli(["-data", str(pfllib_folder), "-m", "dnn", "-algo", "FedAvg", "-gr", "3",
                       "-lr", "0.05", "-t", "2", "-eg", "1"], tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert "best test accuracy" in proc.stdout and "mean time per round" in proc.stdout
  # the report on stdout (header, round lines, summary); stderr only for errors and stops
  assert "round    3 | test_acc" in proc.stdout and "FedAvg on digits5" in proc.stdout
  assert proc.stderr == ""
  files = sorted(os.listdir(out))
  assert files == sorted(["digits5_FedAvg_test_0.json", "digits5_FedAvg_test_0.h5",
                          "digits5_FedAvg_test_0.png", "digits5_FedAvg_test_1.json",
                          "digits5_FedAvg_test_1.h5", "digits5_FedAvg_test_1.png",
                          "digits5_FedAvg_test_partition.json"])
  record = json.loads((out / "digits5_FedAvg_test_0.json").read_text())
  assert record["config"]["global_rounds"] == 3 and record["rounds"] == [0, 1, 2, 3]
  for key in ("test_acc", "test_auc", "train_loss"):
    assert len(record[key]) == 4 and all(np.isfinite(record[key]))
  assert len(record["round_time_s"]) == 4
  assert record["best_test_acc"] == max(record["test_acc"])
  assert record["last_test_acc"] == record["test_acc"][-1]
  with h5py.File(out / "digits5_FedAvg_test_0.h5") as f:
    np.testing.assert_allclose(f["rs_test_acc"][()], record["test_acc"])
    np.testing.assert_allclose(f["rs_test_auc"][()], record["test_auc"])
    assert len(f["rs_test_auc"][()]) == 4  # filled, unlike PFLlib's
    np.testing.assert_allclose(f["rs_train_loss"][()], record["train_loss"])
  assert (out / "digits5_FedAvg_test_0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  partition = json.loads((out / "digits5_FedAvg_test_partition.json").read_text())
  assert partition["num_clients"] == 5 and len(partition["samples_per_label"]) == 5
  # Different seeds per repetition: the two runs differ.
  other = json.loads((out / "digits5_FedAvg_test_1.json").read_text())
  assert other["seed"] == record["seed"] + 1 and other["test_acc"] != record["test_acc"]


# ------------------------------------------------------------------ --help and the README table
_FLAG = re.compile(r"`(-{1,2}[A-Za-z][\w-]*)")


def readme_flag_rows():
  """(flags, default cell without backticks, line) of each row of README.md's flag table.

  Rows whose first two cells name no flag are group headings (``| **data** | | | |``).
  """
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    section = f.read().split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
  rows = []
  for line in section.splitlines():
    if not line.startswith("|"):
      continue
    short, long, default, _ = [c.strip() for c in line.strip()[1:-1].split("|", 3)]
    if short == "short" or re.fullmatch(r":?-+:?", short):
      continue  # the header and the separator row
    flags = _FLAG.findall(f"{short} {long}")
    if not flags:
      assert short.startswith("**") and not long and not default, f"not a flag row: {line}"
      continue
    rows.append((flags, default.replace("`", ""), line))
  return rows


def parser_options(parser):
  """The parser's flags (each action once), without -h/--help."""
  return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def test_readme_flag_table_matches_the_parser():
  parser = cli.build_parser()
  by_flag = {flag: a for a in parser_options(parser) for flag in a.option_strings}
  problems, covered = [], []
  for flags, default, line in readme_flag_rows():
    unknown = [f for f in flags if f not in by_flag]
    if unknown:
      problems.append(f"{unknown} not in the parser: {line}")
      continue
    action = by_flag[flags[0]]
    if any(by_flag[f] is not action for f in flags):
      problems.append(f"one row per flag (with its spellings): {line}")
    if sorted(flags) != sorted(action.option_strings):
      problems.append(f"give every spelling {action.option_strings}: {line}")
    if default != (cli.default_text(action) or ""):
      problems.append(f"default {default!r}, the parser's is {cli.default_text(action)!r}: "
                      f"{line}")
    covered.append(action)
  for action in parser_options(parser):
    count = sum(a is action for a in covered)
    if count != 1:
      problems.append(f"{'/'.join(action.option_strings)} is in the README table {count} times")
  assert not problems, "\n".join(problems)


def test_help_shows_defaults_and_valid_names():
  from fedjax_lib.algorithms import algorithm_names  # pylint: disable=import-outside-toplevel
  from fedjax_lib.data import registry as data_registry  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models import MODEL_NAMES  # pylint: disable=import-outside-toplevel
  proc = subprocess.run([sys.executable, "-m", "fedjax_lib", "--help"], capture_output=True,
                        text=True, cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stderr
  text = " ".join(proc.stdout.split())  # undo the line wrapping
  for action in parser_options(cli.build_parser()):
    shown = cli.default_text(action)
    if shown is not None:
      assert f"(default: {shown})" in text, action.option_strings
  assert "-gr, --global_rounds, --global-rounds GLOBAL_ROUNDS" in text
  assert "try -gr 50 first (default: 2000)" in text
  assert ("(default: 0.0 (APPLE, Ditto, FedProx, GPFL, MOON), 50.0 (FedKTL), 0.9 (FedPHP))"
          in text)
  assert ("(default: 100.0 (FedCAC), 1.0 (FedNTD, FML, pFedMe), the learning rate (PerAvg))"
          in text)  # PerAvg: unset
  for names in (algorithm_names(), MODEL_NAMES, data_registry.names()):
    assert f"{', '.join(names)}" in text


def test_every_algorithm_flag_is_taken_by_an_algorithm():
  for _, dest, _, _ in cli.ALGORITHM_FLAGS:
    names, shown = cli.algorithm_flag_defaults(dest)
    assert names and shown, dest


def test_readme_names_every_algorithm_model_and_dataset():
  from fedjax_lib.algorithms import algorithm_names  # pylint: disable=import-outside-toplevel
  from fedjax_lib.data import registry as data_registry  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models import MODEL_NAMES  # pylint: disable=import-outside-toplevel
  rows = {flags[0]: line for flags, _, line in readme_flag_rows()}
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    algorithms = f.read().split("\n## Algorithms\n", 1)[1]
  assert [n for n in algorithm_names() if f"| `{n}`" not in algorithms] == []
  assert [n for n in MODEL_NAMES if f"`{n}`" not in rows["-m"]] == []
  assert [n for n in data_registry.names() if f"`{n}`" not in rows["-data"]] == []
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    data_section = f.read().split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
  # every name, loadable or a PFLlib folder, has its row (modality, shape, scenario, source)
  assert [n for n in data_registry.names(available_only=False)
          if f"| `{n}` |" not in data_section] == []


def test_list_datasets_prints_every_name_and_exits(capsys):
  from fedjax_lib.data import registry as data_registry  # pylint: disable=import-outside-toplevel
  assert cli.main(["--list-datasets", "--data-dir", "/nonexistent/tfds"]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[0].split()[:4] == ["name", "modality", "shape", "classes"]
  for name in data_registry.names(available_only=False):
    assert any(line.startswith(name + " ") for line in out.splitlines()), name
  assert "cache: /nonexistent/tfds/fedjax_arrays" in out


def test_text_models_get_the_vocabulary_of_vs_else_the_datasets():
  from fedjax_lib import runner  # pylint: disable=import-outside-toplevel
  config = parse(["-data", "ag_news", "-m", "lstm"])
  assert runner.model_options(config, "lstm") == {"vocab_size": 32000}
  assert runner.model_options(config.replace(vocab_size=100), "lstm") == {"vocab_size": 100}
  assert runner.model_options(config.replace(dataset="digits"), "lstm") == {}  # the model's 80
  assert runner.model_options(config, "cnn") == {}
  assert parse(["-vs", "5000"]).vocab_size == 5000


def test_pfllib_compat_gives_text_models_the_references_log_softmax_features():
  from fedjax_lib import runner  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models import make_model  # pylint: disable=import-outside-toplevel
  config = parse(["-data", "digits", "-m", "lstm", "--pfllib-compat"])
  assert runner.model_options(config, "lstm") == {"log_softmax_features": True}
  assert runner.model_options(config, "bilstm") == {}  # no log_softmax in its reference
  assert runner.model_options(config, "cnn") == {}
  assert runner.model_options(config.replace(pfllib_compat=False), "lstm") == {}
  # only where the reference splits the model: PFLlib's FedProx, Ditto, SCAFFOLD ... run the
  # whole forward, whose final log_softmax leaves raw logits
  for algorithm, quirk in (("FedAvg", True), ("FedPer", True), ("MOON", True),
                           ("FedProx", False), ("Ditto", False), ("SCAFFOLD", False),
                           ("FedProto", True), ("Local", False)):
    assert bool(runner.model_options(config.replace(algorithm=algorithm), "lstm")) == quirk
  # HtFLlib splits every model: a heterogeneous run gets the quirk whatever the algorithm
  assert runner.model_options(config.replace(algorithm="Local", model="lstm,gru"), "gru") == {
      "log_softmax_features": True}
  # the features are log-probabilities: their exponentials sum to one per sample
  import jax  # pylint: disable=import-outside-toplevel
  model = make_model("fasttext", (6,), 3, vocab_size=20,
                     **runner.model_options(config, "fasttext"))
  x = jax.numpy.arange(12).reshape(2, 6) % 20
  variables = model.init(jax.random.key(0), x)
  features = model.apply(variables, x, method="features")
  np.testing.assert_allclose(np.exp(np.asarray(features)).sum(-1), 1.0, rtol=1e-5)


def test_cnn_on_a_digit5_folder_builds_pfllibs_digit5cnn(tmp_path):
  """PFLlib's main.py builds -m CNN as Digit5CNN on a dataset named Digit5; so does the runner
  (models, algorithm, per-client architectures); -m FedAvgCNN keeps FedAvgCNN."""
  from fedjax_lib import runner  # pylint: disable=import-outside-toplevel
  data = load_federated("digits32", num_clients=2, seed=0, scheme="iid")
  folder = tmp_path / "Digit5"
  write_pfllib_folder(data, str(folder))
  config = parse(["-data", str(folder), "-m", "CNN", "-algo", "FedBN", "-nc", "2", "-gr", "1"])
  built = runner.build(config)
  assert built.architectures == ("digit5cnn",) and list(built.models) == ["digit5cnn"]
  assert type(built.algorithm.model.base).__name__ == "Digit5CNNBase"
  assert not built.warnings   # FedBN finds Digit5CNN's BatchNorm layers: nothing to warn
  built = runner.build(config.replace(model="FedAvgCNN"))
  assert built.architectures == ("cnn",)
  assert any("has none: FedBN runs as FedAvg" in w and "digit5cnn" in w for w in built.warnings)


def test_pfllib_compat_warns_no_effect_only_where_it_has_none():
  """--pfllib-compat with an algorithm without a compat mode: warned as having no effect,
  unless it gives the models their references' log-softmax features (FedPer splits)."""
  from fedjax_lib import checks  # pylint: disable=import-outside-toplevel
  from fedjax_lib import runner  # pylint: disable=import-outside-toplevel
  from fedjax_lib.algorithms import make_algorithm  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core.local import LocalSpec  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models import make_model  # pylint: disable=import-outside-toplevel
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1, steps_per_epoch=1)
  for algorithm, arch, warned in (("FedPer", "fasttext", False), ("FedPer", "cnn", True),
                                  ("FedProx", "fasttext", True)):
    config = parse(["-data", "ag_news", "-m", arch, "-algo", algorithm, "--pfllib-compat"])
    model = make_model(arch, (6,) if arch != "cnn" else (28, 28, 1), 4,
                       **runner.model_options(config, arch))
    found = checks._ignored(config, make_algorithm(algorithm, model, spec), {arch: model})  # pylint: disable=protected-access
    assert any("pfllib_compat=True has no effect" in w for w in found) == warned, (
        algorithm, arch, found)


_BLAS_THREADS = ("import json, threadpoolctl; from fedjax_lib import cli; cli.one_blas_thread(); "
                 "import jax.numpy as jnp; jnp.linalg.svd(jnp.ones((8, 8)))[1].block_until_ready(); "
                 "print(json.dumps([i['num_threads'] for i in threadpoolctl.threadpool_info() "
                 "if i['internal_api'] == 'openblas']))")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS starts one thread on one core")
@pytest.mark.parametrize("setting", [None, "2"])
def test_command_line_runs_openblas_on_one_thread_unless_told(setting):
  """numpy's OpenBLAS (loaded with the CLI) and scipy's (loaded by jaxlib's first LAPACK call,
  here an SVD) both run one thread; a user's OPENBLAS_NUM_THREADS is kept."""
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
  if setting:
    env["OPENBLAS_NUM_THREADS"] = setting
  proc = subprocess.run([sys.executable, "-c", _BLAS_THREADS], capture_output=True, text=True,
                        env=env, timeout=120, check=True)
  threads = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(threads) >= 2  # numpy's and scipy's
  assert threads == [int(setting or 1)] * len(threads)


def test_main_sets_one_blas_thread_before_the_devices(monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(cli, "one_blas_thread", lambda: calls.append("blas"))
  monkeypatch.setattr(cli, "_select_devices", lambda args: calls.append("devices") or "stop")
  assert cli.main(["-data", "digits"]) == 2
  assert calls == ["blas", "devices"] and "error: stop" in capsys.readouterr().err


def xla_out_of_memory():
  """A real XLA allocation failure (4 TiB), as a run that needs more memory than there is."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  try:
    jax.jit(lambda: jnp.ones((2**40,), jnp.float32))().block_until_ready()
  except RuntimeError as e:
    return e
  raise AssertionError("a 4 TiB array was allocated")


def test_out_of_memory_is_one_error_line_not_a_traceback(monkeypatch, tmp_path, capsys):
  from fedjax_lib import runner  # pylint: disable=import-outside-toplevel
  from fedjax_lib.errors import out_of_memory  # pylint: disable=import-outside-toplevel
  error = xla_out_of_memory()
  assert "4398046511104 bytes" in out_of_memory(error)
  assert "numpy" in out_of_memory(MemoryError("Unable to allocate 4 TiB"))
  assert out_of_memory(RuntimeError("INTERNAL: something else")) is None

  def run(config, log=None):
    raise error
  monkeypatch.setattr(runner, "run_experiment", run)
  assert cli.main(["-m", "mlr", "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: out of memory (RESOURCE_EXHAUSTED"), err
  assert "-nc" in err[0] and not (tmp_path / "out").exists()
  # any other runtime error is not disguised
  monkeypatch.setattr(runner, "run_experiment", lambda config, log=None: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    cli.main(["-m", "mlr", "--out", str(tmp_path / "out")])

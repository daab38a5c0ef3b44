"""PyTorch baseline for ``bench_htfl.py``: HtFLlib's sequential execution of ``Local``.

Written from HtFLlib's behaviour (``system/main.py``, ``flcore/trainmodel/models.py``,
``flcore/clients/clientbase.py``, ``clientlocal.py``, ``flcore/servers/serverbase.py``,
``serverlocal.py``); no HtFLlib code is copied. It runs the workload of ``bench_htfl.py``
(HtFE-img-8 by default, 20 clients, CIFAR-shaped synthetic data, 100 train + 25 test samples
per client, batch 10, 1 local epoch, lr 0.01, all clients selected and evaluated every round)
one client after another, as HtFLlib does.

Faithful to HtFLlib:

* Models: client i builds architecture ``i mod K`` of the family after ``torch.manual_seed(0)``
  (HtFLlib reseeds in every client's constructor, so clients of one architecture start
  equal), wrapped as HtFLlib's ``BaseHeadSplit``: the classification layer (``fc``, or the
  ``Linear`` of MobileNetV2's classifier, see below) becomes ``nn.AdaptiveAvgPool1d(512)`` in
  the base and the head is a new ``nn.Linear(512, 10)``. Architectures: HtFLlib's FedAvgCNN
  (conv5×5 3→32, ReLU, max-pool 2, conv5×5 32→64, ReLU, max-pool 2, flatten 1600,
  Linear(1600, 512) + ReLU, fc Linear(512, 10)); torchvision's ``resnet18/34/50/101/152
  (weights=None, num_classes=10)`` and ``googlenet(weights=None, aux_logits=False,
  init_weights=True, num_classes=10)`` (HtFLlib passes ``pretrained=False`` and no
  ``init_weights``, which torchvision resolves to True with a warning); ImageNet strides on
  32×32 inputs as in HtFLlib.
* MobileNetV2: torchvision's ``mobilenet_v2(weights=None, num_classes=10)`` stands in for
  HtFLlib's own copy (``flcore/trainmodel/mobilenet_v2.py``), which has the same layers (stem
  ConvBNReLU 3×3 stride 2 → 32, the 17 inverted residual blocks of the (t, c, n, s) setting,
  ConvBNReLU 1×1 → 1280, global average pool, dropout 0.2, classifier) and the same
  initialisation, but names the classifier ``fc`` with the dropout outside it. Here
  ``classifier[1]`` (the Linear) is replaced, so the dropout stays in the base as in HtFLlib
  (2,229,002 parameters with the 512 pool and the 10-class head, as in HtFLlib).
* Local's round (``serverlocal.Local.train``): select the clients (all, in numpy's random
  order) → evaluate every client → train every selected client in turn. Evaluation
  (``clientbase.test_metrics``): ``model.eval()`` under ``no_grad``, test accuracy and micro
  ROC-AUC of the raw outputs against the binarised labels over a ``DataLoader(test,
  batch_size=10, drop_last=False, shuffle=False)``; then the training loss
  (``clientbase.train_metrics``) over ``DataLoader(train, 10, drop_last=True, shuffle=False)``.
  Training (``clientlocal.train``): a fresh ``torch.optim.SGD(lr=0.01)`` every call,
  ``model.train()`` (BatchNorm batch statistics, running statistics per client; dropout on),
  cross-entropy, 1 epoch over ``DataLoader(train, 10, drop_last=True, shuffle=False)``.
* Everything in one process, one client after another, on one device (cuda if available).

Not faithful / simplified (each makes this baseline faster than HtFLlib, so its time is a lower
bound of HtFLlib's):

* Data in memory on the device: every client's train and test tensors (NCHW float32, int64
  labels) are made once, and each loader is a fresh ``DataLoader`` over a ``TensorDataset`` of
  them. HtFLlib re-reads and decompresses the client's ``.npz`` file from disk for every loader
  and moves each batch to the device.
* Models in memory: HtFLlib ``torch.save``s every client's whole model after training and
  ``torch.load``s it before each evaluation and training (``save_item`` / ``load_item``);
  ``--save-load`` does the same here (into a temporary folder), off by default.
* HtFLlib's current ``serverbase.evaluate`` has the training-loss pass commented out; it is
  done here because the JAX side computes it (it is the larger part of the evaluation: 100
  training samples against 25 test samples per client).
* The micro ROC-AUC is computed with numpy (the Mann–Whitney statistic with tied ranks averaged,
  what ``sklearn.metrics.roc_auc_score(average='micro')`` computes), so scikit-learn is not
  needed; HtFLlib calls scikit-learn.
* No result files, printing of per-client metrics, slow clients or time thresholds (off under
  HtFLlib's defaults).
* Data: ``bench_rounds.make_data(20)`` (the JAX side's arrays, NHWC turned into NCHW) instead
  of a split made by HtFLlib's dataset scripts. It needs numpy and ``fedjax_lib.data`` (no
  JAX): the repository root must be importable (``bench_htfl.py`` sets ``PYTHONPATH``).

Timing: ``eval_s`` is the evaluation of all clients, ``train_s`` the rest of the round (client
selection and training), with ``torch.cuda.synchronize()`` before each clock read on a GPU.
Peak memory: ``torch.cuda.max_memory_allocated()`` on a GPU, the process's peak RSS
(``VmHWM``) on the CPU.

    PYTHONPATH=. python experiments/benchmarks/torch_htfl.py --family HtFE-img-8 --rounds 3

The result is a JSON object written to ``--out`` after every round (and printed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for _p in (HERE, ROOT):
  if _p not in sys.path:
    sys.path.insert(0, _p)

# PFLlib's and HtFLlib's FedAvgCNN are the same model (dim=1600 for 32×32 images).
from torch_baseline import FedAvgCNN  # noqa: E402  pylint: disable=wrong-import-position
# PFLlib's evaluate: the same per-client loop over test and train metrics.
from torch_baseline import evaluate_clients  # noqa: E402  pylint: disable=wrong-import-position

NUM_CLIENTS = 20
NUM_CLASSES = 10
BATCH_SIZE = 10
LEARNING_RATE = 0.01
LOCAL_EPOCHS = 1
FEATURE_DIM = 512

#: HtFLlib's families (``system/main.py``) in the canonical names of ``fedjax_lib.models``.
_HTFE_8 = ("cnn", "googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101",
           "resnet152")
FAMILIES = {
    "htfe-img-2": ("cnn", "resnet18"),
    "htfe-img-4": ("cnn", "googlenet", "mobilenet_v2", "resnet18"),
    "htfe-img-5": ("googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50"),
    "htfe-img-8": _HTFE_8,
}
_ALIASES = {"fedavgcnn": "cnn", "mobilenetv2": "mobilenet_v2", "htfe2": "htfe-img-2",
            "htfe4": "htfe-img-4", "htfe5": "htfe-img-5", "htfe8": "htfe-img-8"}
ARCHITECTURES = ("cnn", "googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50",
                 "resnet101", "resnet152")


def parse_family(spec: str) -> tuple[str, ...]:
  """A family name or a comma list of architectures → the architecture of index j."""
  key = _ALIASES.get(spec.strip().lower(), spec.strip().lower())
  if key in FAMILIES:
    return FAMILIES[key]
  names = tuple(_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in spec.split(","))
  bad = [n for n in names if n not in ARCHITECTURES]
  if bad:
    raise SystemExit(f"torch_htfl.py: unknown architecture(s) {bad}; accepted: "
                     f"{', '.join(ARCHITECTURES)} or one of {', '.join(FAMILIES)}")
  return names


def _backbone(name: str) -> nn.Module:
  tv = torchvision.models
  if name == "cnn":
    return FedAvgCNN(3, NUM_CLASSES, 1600)
  if name.startswith("resnet"):
    return getattr(tv, name)(weights=None, num_classes=NUM_CLASSES)
  if name == "googlenet":
    return tv.googlenet(weights=None, aux_logits=False, init_weights=True,
                        num_classes=NUM_CLASSES)
  if name == "mobilenet_v2":
    return tv.mobilenet_v2(weights=None, num_classes=NUM_CLASSES)
  raise ValueError(name)


class BaseHeadSplit(nn.Module):
  """HtFLlib's ``BaseHeadSplit``: classification layer → ``AdaptiveAvgPool1d(F)``, new head."""

  def __init__(self, name: str, feature_dim: int = FEATURE_DIM):
    super().__init__()
    self.base = _backbone(name)
    if name == "mobilenet_v2":  # HtFLlib's copy: fc after the dropout (see the docstring)
      self.base.classifier[1] = nn.AdaptiveAvgPool1d(feature_dim)
    else:
      self.base.fc = nn.AdaptiveAvgPool1d(feature_dim)
    self.head = nn.Linear(feature_dim, NUM_CLASSES)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(self.base(x))


def micro_auc(onehot: np.ndarray, scores: np.ndarray) -> float:
  """``roc_auc_score(onehot, scores, average='micro')``: one binary AUC over all entries."""
  y = onehot.ravel().astype(bool)
  s = scores.ravel().astype(np.float64)
  pos, neg = int(y.sum()), int((~y).sum())
  if pos == 0 or neg == 0:
    return float("nan")
  order = np.argsort(s, kind="mergesort")
  sorted_s = s[order]
  ranks = np.empty(len(s), np.float64)
  # average ranks over ties (1-based)
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
  ends = np.r_[starts[1:], len(s)]
  for a, b in zip(starts, ends):
    ranks[order[a:b]] = (a + b + 1) / 2.0
  return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def peak_rss_bytes() -> int:
  """This process's peak resident set (``VmHWM``; ``ru_maxrss`` where there is no /proc).

  Not `fedjax_lib.memory.peak_rss_bytes`: that module imports JAX, which the PyTorch
  process must not load (it runs in an environment that may have no JAX).
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Client:
  """One HtFLlib client running Local: its own model, data on the device."""

  def __init__(self, cid: int, arch: str, train: tuple, test: tuple, device: torch.device,
               save_dir: str | None):
    torch.manual_seed(0)  # HtFLlib's Client.__init__
    self.id = cid
    self.arch = arch
    self.device = device
    self.train_set = TensorDataset(*train)
    self.test_set = TensorDataset(*test)
    self.train_samples, self.test_samples = len(self.train_set), len(self.test_set)
    self.loss = nn.CrossEntropyLoss()
    self._model = BaseHeadSplit(arch).to(device)
    self._path = None
    if save_dir is not None:
      self._path = os.path.join(save_dir, f"Client_{cid}_model.pt")
      self.save(self._model)
      self._model = None

  # HtFLlib's save_item / load_item when --save-load; otherwise the model stays in memory.
  def load(self) -> nn.Module:
    if self._path is None:
      return self._model
    return torch.load(self._path, map_location=self.device, weights_only=False)

  def save(self, model: nn.Module) -> None:
    if self._path is not None:
      torch.save(model, self._path)

  def load_train_data(self) -> DataLoader:
    return DataLoader(self.train_set, BATCH_SIZE, drop_last=True, shuffle=False)

  def load_test_data(self) -> DataLoader:
    return DataLoader(self.test_set, BATCH_SIZE, drop_last=False, shuffle=False)

  def train(self) -> None:
    loader = self.load_train_data()
    model = self.load()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model.train()
    for _ in range(LOCAL_EPOCHS):
      for x, y in loader:
        x, y = x.to(self.device), y.to(self.device)
        loss = self.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    self.save(model)

  def test_metrics(self) -> tuple[int, int, float]:
    loader = self.load_test_data()
    model = self.load()
    model.eval()
    correct, count, probs, onehots = 0, 0, [], []
    with torch.no_grad():
      for x, y in loader:
        x, y = x.to(self.device), y.to(self.device)
        out = model(x)
        correct += int((torch.sum(torch.argmax(out, dim=1) == y)).item())
        count += y.shape[0]
        probs.append(out.detach().cpu().numpy())
        onehots.append(np.eye(NUM_CLASSES, dtype=np.int64)[y.detach().cpu().numpy()])
    return correct, count, micro_auc(np.concatenate(onehots), np.concatenate(probs))

  def train_metrics(self) -> tuple[float, int]:
    loader = self.load_train_data()
    model = self.load()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
      for x, y in loader:
        x, y = x.to(self.device), y.to(self.device)
        total += self.loss(model(x), y).item() * y.shape[0]
        count += y.shape[0]
    return total, count


class Server:
  """HtFLlib's ``Local`` server: evaluate every client, then train each selected one."""

  def __init__(self, clients: list[Client], device: torch.device):
    self.clients = clients
    self.device = device
    self.num_join = len(clients)  # join ratio 1

  def sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def select_clients(self) -> list[Client]:
    return list(np.random.choice(self.clients, self.num_join, replace=False))

  def evaluate(self) -> dict:
    return evaluate_clients(self.clients)

  def round(self) -> tuple[float, float, dict]:
    """One round; returns (train seconds, eval seconds, metrics)."""
    self.sync()
    t0 = time.perf_counter()
    selected = self.select_clients()
    t1 = time.perf_counter()
    stats = self.evaluate()
    self.sync()
    t2 = time.perf_counter()
    for client in selected:
      client.train()
    self.sync()
    t3 = time.perf_counter()
    return (t1 - t0) + (t3 - t2), t2 - t1, stats


def _write_json(path: str | None, obj) -> None:
  if not path:
    return
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--family", default="HtFE-img-8",
                 help="HtFE-img-2/4/5/8 or a comma list of cnn, googlenet, mobilenet_v2, "
                      "resnet18..152")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds after the first")
  p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
  p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
  p.add_argument("--save-load", action="store_true",
                 help="torch.save / torch.load every model around each use, as HtFLlib")
  p.add_argument("--out", default=None, help="write the JSON result here after every round")
  args = p.parse_args()
  if args.rounds < 1:
    p.error("--rounds must be >= 1")
  t_start = time.perf_counter()
  device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                        if args.device == "auto" else args.device)
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  names = parse_family(args.family)

  from bench_rounds import make_data  # pylint: disable=import-outside-toplevel
  data = make_data(NUM_CLIENTS)
  x_all = torch.from_numpy(np.ascontiguousarray(data.x.transpose(0, 3, 1, 2)))
  y_all = torch.from_numpy(data.y.astype(np.int64))

  def split(idx, count):
    rows = torch.from_numpy(np.asarray(idx[:count], np.int64))
    return x_all[rows].to(device), y_all[rows].to(device)

  save_dir = tempfile.mkdtemp(prefix="torch_htfl_") if args.save_load else None
  clients = [Client(i, names[i % len(names)],
                    split(data.train_idx[i], data.train_count[i]),
                    split(data.test_idx[i], data.test_count[i]), device, save_dir)
             for i in range(NUM_CLIENTS)]
  params = {}
  for c in clients:
    if c.arch not in params:
      params[c.arch] = sum(q.numel() for q in c.load().parameters())
  server = Server(clients, device)
  setup = time.perf_counter() - t_start
  device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else platform.processor() or platform.machine())
  row = {"impl": "torch", "algo": "Local", "family": args.family, "architectures": list(names),
         "executor": "torch-sequential", "device": str(device), "device_name": device_name,
         "threads": torch.get_num_threads(), "save_load": args.save_load,
         "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                      "python": platform.python_version()},
         "params": params, "setup_s": setup, "complete": False, "train_s_all": [],
         "eval_s_all": []}

  def save(**kw):
    row.update(kw)
    if device.type == "cuda":
      row["memory_kind"] = "torch.cuda.max_memory_allocated"
      row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
      row["memory_kind"] = "process peak RSS"
      row["peak_memory_bytes"] = peak_rss_bytes()
    _write_json(args.out, row)

  print(f"[torch Local] {device_name} ({device}), {torch.get_num_threads()} threads, "
        f"architectures {list(dict.fromkeys(names))}, params {params}; setup {setup:.1f} s",
        flush=True)
  save()
  try:
    t = time.perf_counter()
    tr, ev, stats = server.round()
    first = time.perf_counter() - t
    print(f"[torch Local] first round {first:.2f} s (eval {ev:.2f} s, train {tr:.2f} s), "
          f"test_acc {stats['test_acc']:.3f}", flush=True)
    save(first_round_s=first, first_train_s=tr, first_eval_s=ev)
    for r in range(1, args.rounds + 1):
      tr, ev, stats = server.round()
      row["train_s_all"].append(tr)
      row["eval_s_all"].append(ev)
      print(f"[torch Local] round {r}: eval {ev:.2f} s, train {tr:.2f} s, test_acc "
            f"{stats['test_acc']:.3f}, train_loss {stats['train_loss']:.3f}", flush=True)
      save(train_s=sum(row["train_s_all"]) / r, eval_s=sum(row["eval_s_all"]) / r,
           test_acc=stats["test_acc"], test_auc=stats["test_auc"],
           train_loss=stats["train_loss"], timed_rounds=r)
  finally:
    if save_dir is not None:
      shutil.rmtree(save_dir, ignore_errors=True)
  save(complete=True)
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()

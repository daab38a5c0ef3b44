"""PyTorch baseline for ``bench_rounds.py``: a re-creation of PFLlib's FedAvg execution model.

Written from the description of PFLlib in ``/work/shared/reference/pfllib.md`` (§3.2, §4.1,
§5.1–5.3, §5.8) and ``performance.md`` (§5, §10); no PFLlib code is copied. It runs the
benchmark workload of ``bench_rounds.py`` (FedAvgCNN, CIFAR-shaped synthetic data, 100 train +
25 test samples per client, batch 10, 1 local epoch, all clients selected and evaluated every
round) the way PFLlib runs it, so the JAX simulator can be compared with it side by side.

Faithful to PFLlib:

* Data on disk: every client's train and test split is written once as
  ``np.savez_compressed(f, data={'x': NCHW float32, 'y': int64})`` (a pickled dict), and every
  ``load_train_data()`` / ``load_test_data()`` call re-reads and decompresses that file, turns it
  into a Python list of per-sample ``(x, y)`` tensors and wraps it in a fresh
  ``DataLoader(batch_size=10, shuffle=True)`` (``drop_last=True`` for train, ``False`` for
  test), with no workers. One round therefore reads each client's files three times (test
  evaluation, train-loss evaluation, training).
* Model: FedAvgCNN for 3×32×32 and 10 classes (878,538 parameters), PyTorch default init under
  ``torch.manual_seed(0)``, wrapped as FedAvg does in PFLlib's ``main.py``: ``fc`` moved into a
  head, ``BaseHeadSplit(base, head)`` (same parameters, same order). The torch seed is reset to
  0 in every client's constructor.
* Every client holds a ``copy.deepcopy`` of the model, its own plain SGD optimizer (lr 0.005, no
  momentum or weight decay) and a cross-entropy loss.
* The serveravg round: select clients (join ratio 1) → ``send_models`` (clone the global
  parameters into *every* client's model, parameter by parameter) → ``evaluate`` (every client:
  test accuracy and sklearn micro ROC-AUC of the raw outputs against ``label_binarize``d labels
  over its test loader, then the cross-entropy over a fresh train loader pass, both in eval mode
  under ``no_grad``) → every selected client trains in turn (1 epoch over its shuffled,
  drop_last loader) → ``receive_models`` (weights = train-sample fractions, uploads are
  references to the client models) → ``aggregate_parameters`` (deep copy of the first upload,
  zeroed, plus Σ w_k·θ_k over ``.parameters()``). Client selection uses numpy's unseeded global
  RNG, as in PFLlib, so the training order (and hence the shuffles) differs between runs.
* Everything runs in one process, one client after another, on the CPU.

Not faithful / simplified:

* No client drop-out, slow-client simulation, time threshold, DLG, result files, model saving,
  auto-break or per-round printing of the metric table; they are off (or cost nothing) under
  PFLlib's defaults. Wall-clock cost bookkeeping (``train_time_cost``) is left out.
* The data are ``fedjax_lib.data.sources.synthetic(N*125, (32, 32, 3), 10, seed=0)`` (the same
  arrays as the JAX side); client i owns rows [125i, 125i+100) for training and the next 25 for
  testing, instead of a split made by PFLlib's dataset-generation scripts. A child process
  (``pfllib_client_files.py`` in ``--data-python``, standing in for those scripts) writes the
  files to a temporary folder rather than ``../dataset/<name>/``, so neither the full array nor
  JAX (imported by ``fedjax_lib``) is in the measured process, and this script's Python needs
  torch, not JAX.
* ``--in-memory`` (not PFLlib behaviour) decompresses every file once and keeps the arrays, to
  measure how much of the round time the re-reading costs. The per-sample list and the
  DataLoader are still rebuilt on every call.
* Timing: ``eval_s`` is ``evaluate()``; ``train_s`` is the rest of the round (selection, sending,
  local training, receiving, aggregation). Like PFLlib, a round evaluates *before* it trains, so
  the last reported accuracy is that of the model after ``--rounds`` aggregations (the warm-up
  round's included); the final aggregate is never evaluated.
* Peak memory is the simulating process's peak RSS (``ru_maxrss``; the data-writing child is
  not counted).

    python experiments/benchmarks/torch_baseline.py --clients 100 --rounds 2 --threads 2

The last stdout line is one JSON object (``bench_rounds.py`` parses it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from sklearn import metrics
from sklearn.preprocessing import label_binarize
from torch import nn
from torch.utils.data import DataLoader

from pfllib_client_files import NUM_CLASSES  # the data's labels (this script's folder)

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH_SIZE = 10
LEARNING_RATE = 0.005
LOCAL_EPOCHS = 1
JOIN_RATIO = 1.0
EXPECTED_PARAMS = 878_538


class FedAvgCNN(nn.Module):
  """PFLlib's "4-layer CNN": two 5×5 conv + ReLU + 2×2 max-pool blocks, then two linear layers."""

  def __init__(self, in_features: int = 3, num_classes: int = 10, dim: int = 1600):
    super().__init__()
    self.conv1 = nn.Sequential(nn.Conv2d(in_features, 32, kernel_size=5, padding=0, stride=1),
                               nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=(2, 2)))
    self.conv2 = nn.Sequential(nn.Conv2d(32, 64, kernel_size=5, padding=0, stride=1),
                               nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=(2, 2)))
    self.fc1 = nn.Sequential(nn.Linear(dim, 512), nn.ReLU(inplace=True))
    self.fc = nn.Linear(512, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.conv2(self.conv1(x))
    return self.fc(self.fc1(torch.flatten(out, 1)))


class BaseHeadSplit(nn.Module):
  """PFLlib's FedAvg wraps the model as ``head(base(x))``, the base's ``fc`` being Identity."""

  def __init__(self, base: nn.Module, head: nn.Module):
    super().__init__()
    self.base = base
    self.head = head

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(self.base(x))


def make_model() -> nn.Module:
  """FedAvgCNN for 3×32×32 and 10 classes, split into base and head as PFLlib does for FedAvg."""
  torch.manual_seed(0)
  model = FedAvgCNN(3, NUM_CLASSES, 1600)
  head = model.fc
  model.fc = nn.Identity()
  return BaseHeadSplit(model, head)


class ClientStore:
  """Client data: PFLlib's per-client ``.npz`` files, re-read on every load unless in memory."""

  def __init__(self, num_clients: int, in_memory: bool, data_python: str):
    self._tmp = tempfile.TemporaryDirectory(prefix="pfllib_baseline_")
    subprocess.run([data_python, os.path.join(HERE, "pfllib_client_files.py"),
                    str(num_clients), self._tmp.name], check=True)
    self._cache = None
    if in_memory:  # not PFLlib: decompress every file once and keep the arrays
      self._cache = {(split, cid): self._read(split, cid) for split in ("train", "test")
                     for cid in range(num_clients)}

  def _read(self, split: str, cid: int) -> dict:
    with open(os.path.join(self._tmp.name, split, f"{cid}.npz"), "rb") as f:
      return np.load(f, allow_pickle=True)["data"].tolist()

  def read_client_data(self, cid: int, is_train: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list of per-sample (x, y) tensors, as PFLlib's ``read_client_data`` returns."""
    split = "train" if is_train else "test"
    data = self._read(split, cid) if self._cache is None else self._cache[(split, cid)]
    xs = torch.Tensor(data["x"]).type(torch.float32)
    ys = torch.Tensor(data["y"]).type(torch.int64)
    return list(zip(xs, ys))

  def cleanup(self) -> None:
    self._tmp.cleanup()


DEVICE = torch.device("cpu")


class Client:
  """One PFLlib-style client: its own model copy, optimizer and loaders rebuilt on each use."""

  def __init__(self, cid: int, model: nn.Module, store: ClientStore, train_samples: int,
               test_samples: int):
    torch.manual_seed(0)  # PFLlib reseeds torch in every client's constructor.
    self.id = cid
    self.store = store
    self.model = copy.deepcopy(model)
    self.train_samples = train_samples
    self.test_samples = test_samples
    self.loss = nn.CrossEntropyLoss()
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)

  def load_train_data(self) -> DataLoader:
    return DataLoader(self.store.read_client_data(self.id, True), BATCH_SIZE, drop_last=True,
                      shuffle=True)

  def load_test_data(self) -> DataLoader:
    return DataLoader(self.store.read_client_data(self.id, False), BATCH_SIZE, drop_last=False,
                      shuffle=True)

  def set_parameters(self, model: nn.Module) -> None:
    for new, old in zip(model.parameters(), self.model.parameters()):
      old.data = new.data.clone()

  def train(self) -> None:
    loader = self.load_train_data()
    self.model.train()
    for _ in range(LOCAL_EPOCHS):
      for x, y in loader:
        x, y = x.to(DEVICE), y.to(DEVICE)
        loss = self.loss(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

  def test_metrics(self) -> tuple[int, int, float]:
    loader = self.load_test_data()
    self.model.eval()
    correct, count, scores, onehots = 0, 0, [], []
    with torch.no_grad():
      for x, y in loader:
        out = self.model(x.to(DEVICE)).cpu()
        correct += int((torch.argmax(out, dim=1) == y).sum().item())
        count += y.shape[0]
        scores.append(out.detach().numpy())
        onehots.append(label_binarize(y.numpy(), classes=np.arange(NUM_CLASSES)))
    auc = metrics.roc_auc_score(np.concatenate(onehots), np.concatenate(scores), average="micro")
    return correct, count, float(auc)

  def train_metrics(self) -> tuple[float, int]:
    loader = self.load_train_data()
    self.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
      for x, y in loader:
        x, y = x.to(DEVICE), y.to(DEVICE)
        total += self.loss(self.model(x), y).item() * y.shape[0]
        count += y.shape[0]
    return total, count


def evaluate_clients(clients) -> dict:
  """PFLlib's ``evaluate``: every client's test metrics, then its train loss, sample-weighted
  (clients with ``test_metrics() -> (correct, n, auc)`` and ``train_metrics() -> (loss, n)``)."""
  correct, tested, auc_sum = 0, 0, 0.0
  for c in clients:
    ok, n, auc = c.test_metrics()
    correct, tested, auc_sum = correct + ok, tested + n, auc_sum + auc * n
  loss_sum, trained = 0.0, 0
  for c in clients:
    loss, n = c.train_metrics()
    loss_sum, trained = loss_sum + loss, trained + n
  return {"test_acc": correct / tested, "test_auc": auc_sum / tested,
          "train_loss": loss_sum / trained}


class Server:
  """PFLlib's serveravg round, one client after another."""

  def __init__(self, model: nn.Module, store: ClientStore, num_clients: int):
    self.global_model = copy.deepcopy(model)
    self.clients = []
    for cid in range(num_clients):
      # PFLlib reads both splits once at set-up only to learn the sample counts.
      train, test = store.read_client_data(cid, True), store.read_client_data(cid, False)
      self.clients.append(Client(cid, model, store, len(train), len(test)))
    self.num_join = int(num_clients * JOIN_RATIO)
    self.selected: list[Client] = []
    self.uploaded_weights: list[float] = []
    self.uploaded_models: list[nn.Module] = []

  def select_clients(self) -> list[Client]:
    return list(np.random.choice(self.clients, self.num_join, replace=False))

  def send_models(self) -> None:
    for client in self.clients:  # every client, not only the selected ones
      client.set_parameters(self.global_model)

  def evaluate(self) -> dict:
    return evaluate_clients(self.clients)

  def receive_models(self) -> None:
    active = random.sample(self.selected, self.num_join)  # client_drop_rate = 0
    total = sum(c.train_samples for c in active)
    self.uploaded_weights = [c.train_samples / total for c in active]
    self.uploaded_models = [c.model for c in active]

  def aggregate_parameters(self) -> None:
    self.global_model = copy.deepcopy(self.uploaded_models[0])
    for param in self.global_model.parameters():
      param.data.zero_()
    for w, client_model in zip(self.uploaded_weights, self.uploaded_models):
      for server_param, client_param in zip(self.global_model.parameters(),
                                            client_model.parameters()):
        server_param.data += client_param.data.clone() * w

  def round(self) -> tuple[float, float, dict]:
    """One serveravg iteration; returns (train seconds, eval seconds, metrics)."""
    t0 = time.perf_counter()
    self.selected = self.select_clients()
    self.send_models()
    t1 = time.perf_counter()
    stats = self.evaluate()
    t2 = time.perf_counter()
    for client in self.selected:
      client.train()
    self.receive_models()
    self.aggregate_parameters()
    if DEVICE.type == "cuda":
      torch.cuda.synchronize()
    t3 = time.perf_counter()
    return (t1 - t0) + (t3 - t2), t2 - t1, stats


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--clients", type=int, required=True)
  p.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up")
  p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
  p.add_argument("--in-memory", action="store_true",
                 help="keep client data in memory instead of re-reading .npz files (not PFLlib)")
  p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (PFLlib -dev)")
  p.add_argument("--data-python", default=sys.executable,
                 help="the Python that writes the client files (pfllib_client_files.py: it "
                 "needs fedjax_lib's dependencies, not torch; default: this one)")
  args = p.parse_args()
  global DEVICE  # pylint: disable=global-statement
  DEVICE = torch.device(args.device)
  if args.rounds < 1:
    p.error("--rounds must be >= 1")
  if args.threads > 0:
    torch.set_num_threads(args.threads)

  n = args.clients
  store = ClientStore(n, args.in_memory, args.data_python)
  model = make_model().to(DEVICE)
  num_params = sum(p.numel() for p in model.parameters())
  assert num_params == EXPECTED_PARAMS, num_params
  server = Server(model, store, n)
  try:
    t = time.perf_counter()
    tr, ev, stats = server.round()
    first = time.perf_counter() - t
    print(f"warm-up round: {first:.2f} s (train {tr:.2f} s, eval {ev:.2f} s), {stats}",
          file=sys.stderr, flush=True)
    train, evals = [], []
    for r in range(1, args.rounds + 1):
      tr, ev, stats = server.round()
      train.append(tr)
      evals.append(ev)
      print(f"round {r}: train {tr:.2f} s, eval {ev:.2f} s, {stats}", file=sys.stderr,
            flush=True)
  finally:
    store.cleanup()
  print(json.dumps({
      "clients": n, "executor": "torch-sequential", "train_s": min(train), "eval_s": min(evals),
      "train_s_all": train, "eval_s_all": evals, "first_round_s": first,
      "peak_memory_bytes": (torch.cuda.max_memory_allocated() if DEVICE.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
      "memory_kind": ("torch.cuda.max_memory_allocated" if DEVICE.type == "cuda"
                      else "process peak RSS"),
      "device": str(DEVICE), "torch_version": torch.__version__,
      "threads": torch.get_num_threads(), "in_memory": args.in_memory,
      "test_acc": stats["test_acc"], "test_auc": stats["test_auc"],
      "train_loss": stats["train_loss"], "evaluated_after_aggregations": args.rounds}))


if __name__ == "__main__":
  main()

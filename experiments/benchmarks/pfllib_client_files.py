"""The client files of ``torch_baseline.py``: PFLlib's dataset-generation step for its workload.

Writes one ``train/<cid>.npz`` and one ``test/<cid>.npz`` per client, as PFLlib's generation
scripts do: ``np.savez_compressed(f, data={'x': NCHW float32, 'y': int64})``. The arrays are
``fedjax_lib.data.sources.synthetic(N*125, (32, 32, 3), 10, seed=0)``, the JAX side's; client i
owns rows [125i, 125i+100) for training and the next 25 for testing. Needs the library's
dependencies and not torch, so it runs in the Python that runs the JAX benchmark
(``torch_baseline.py --data-python``) while the baseline itself may run in a Python with torch
alone; and, as a child process, it keeps the full array and JAX out of the baseline's memory.

    python experiments/benchmarks/pfllib_client_files.py CLIENTS FOLDER
"""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_PER_CLIENT, TEST_PER_CLIENT = 100, 25
NUM_CLASSES = 10


def write_client_files(num_clients: int, folder: str) -> None:
  """Every client's train and test ``.npz`` file under ``folder``."""
  sys.path.insert(0, ROOT)
  from fedjax_lib.data import sources  # pylint: disable=import-outside-toplevel
  per = TRAIN_PER_CLIENT + TEST_PER_CLIENT
  x, y = sources.synthetic(num_clients * per, (32, 32, 3), NUM_CLASSES, seed=0)
  for split in ("train", "test"):
    os.makedirs(os.path.join(folder, split), exist_ok=True)
  for cid in range(num_clients):
    start = cid * per
    for split, lo, hi in (("train", start, start + TRAIN_PER_CLIENT),
                          ("test", start + TRAIN_PER_CLIENT, start + per)):
      # PFLlib stores images already normalised, NCHW float32, labels int64.
      data = {"x": np.ascontiguousarray(x[lo:hi].transpose(0, 3, 1, 2), dtype=np.float32),
              "y": y[lo:hi].astype(np.int64)}
      with open(os.path.join(folder, split, f"{cid}.npz"), "wb") as f:
        np.savez_compressed(f, data=data)


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(f"usage: {sys.argv[0]} CLIENTS FOLDER")
  write_client_files(int(sys.argv[1]), sys.argv[2])

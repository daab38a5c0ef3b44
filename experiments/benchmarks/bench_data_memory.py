"""Host and device memory of a tfds-style image set held as uint8 pixels (`QuantizedImages`,
what `-data cifar10` and the other tfds image sets load) against its float32 copy (what they
held before), side by side in one invocation.

Each variant runs in a fresh process: random uint8 pixels of ``--samples`` images of
``--shape`` (CIFAR-10's 60,000 × 32×32×3 by default), partitioned over 20 IID clients by
`build_federated`, then placed on the default device by `DeviceData.from_federated`. Reported:
the device bytes of ``x`` and the process's peak RSS (``ru_maxrss``), which includes the
device copy on the CPU backend.

    python experiments/benchmarks/bench_data_memory.py
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import subprocess
import sys


def measure(kind: str, samples: int, shape: tuple[int, ...]) -> str:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from fedjax_lib.data import build_federated, images  # pylint: disable=import-outside-toplevel
  from fedjax_lib.data.quantized import QuantizedImages  # pylint: disable=import-outside-toplevel
  r = np.random.default_rng(0)
  raw = r.integers(0, 256, (samples, *shape), dtype=np.uint8)
  y = r.integers(0, 10, samples).astype(np.int32)
  x = QuantizedImages(raw) if kind == "uint8" else images.to_float(raw)
  data = build_federated("images", x, y, 10, 20, "iid", 0, balance=True)
  device = engine_lib.DeviceData.from_federated(data)
  jax.block_until_ready(device)
  device_bytes = sum(a.nbytes for a in jax.tree.leaves(device.x))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return f"| {kind} | {device_bytes / 2**20:.1f} | {peak / 2**20:.0f} |"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--samples", type=int, default=60000)
  parser.add_argument("--shape", default="32,32,3")
  parser.add_argument("--kind", choices=["uint8", "float32"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  shape = tuple(int(d) for d in args.shape.split(","))
  if args.kind:
    print(measure(args.kind, args.samples, shape))
    return
  import jax  # pylint: disable=import-outside-toplevel
  print(f"{args.samples} images of {shape}, 20 IID clients; {datetime.date.today()}, "
        f"jax {jax.__version__}, {jax.default_backend()}, {platform.machine()}, "
        f"Python {platform.python_version()}")
  print("| x held as | device bytes of x (MiB) | peak RSS (MiB) |\n|---|---|---|")
  for kind in ("uint8", "float32"):
    out = subprocess.run([sys.executable, __file__, "--kind", kind, "--samples",
                          str(args.samples), "--shape", args.shape],
                         capture_output=True, text=True, check=True)
    print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
  main()

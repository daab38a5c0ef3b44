"""XLA's convolution against im2col + matmul (``conv_impl='slices'``) on XLA:CPU, one 3×3
convolution (padding 1, stride 1, C → C channels) per map size, at batch 10 and 100:
microseconds per sample and GFLOP/s, best of 5 calls after a compiling one. The measurement
behind ``SLICES_MAX_OUTPUT_AREA`` in `fedjax_lib.models.layers`.

    python experiments/benchmarks/bench_conv_shapes.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from fedjax_lib.models.layers import _slices_conv  # pylint: disable=wrong-import-position


def best(f, *args):
  f(*args).block_until_ready()
  times = []
  for _ in range(5):
    start = time.perf_counter()
    f(*args).block_until_ready()
    times.append(time.perf_counter() - start)
  return min(times)


PAD = ((1, 1), (1, 1))
for hw, c in [(1, 512), (2, 256), (2, 512), (4, 128), (4, 256), (8, 64), (8, 128), (16, 64),
              (16, 32), (28, 1), (12, 32)]:
  for b in (10, 100):
    x = jax.numpy.asarray(np.random.randn(b, hw, hw, c).astype(np.float32))
    w = jax.numpy.asarray(np.random.randn(3, 3, c, c).astype(np.float32) * 0.01)
    xla = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), PAD, dimension_numbers=("NHWC", "HWIO", "NHWC")))
    slices = jax.jit(lambda x, w: _slices_conv(x, w, (1, 1), PAD))
    gflop = hw * hw * c * c * 9 * 2 / 1e9
    t_xla, t_slices = best(xla, x, w) / b, best(slices, x, w) / b
    print(f"{hw}x{hw} map, {c} channels, batch {b}: XLA {t_xla * 1e6:.1f} us/sample "
          f"({gflop / t_xla:.0f} GFLOP/s), slices {t_slices * 1e6:.1f} "
          f"({gflop / t_slices:.0f} GFLOP/s)", flush=True)

"""`QuantizedImages`: uint8 images scaled when indexed read exactly as their float32 copy.

Scaling against `images.to_float` for every pixel value (numpy and compiled jax); a federated
run on uint8 pixels against the same run on the float32 copy (bit-identical states and
metrics, on one device and on eight); the device holds one byte per pixel; the
PFLlib writer and a tfds dataset through the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fedjax_lib import cli
from fedjax_lib.algorithms import make_algorithm
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import LocalSpec
from fedjax_lib.data import images, read_pfllib_folder, write_pfllib_folder
from fedjax_lib.data.federated import FederatedData
from fedjax_lib.data.quantized import QuantizedImages, scale
from fedjax_lib.models import make_model

ALL_VALUES = np.arange(256, dtype=np.uint8).reshape(16, 4, 4, 1)


@pytest.mark.parametrize("value_range", ["pm1", "unit"])
def test_scaling_is_to_float_for_every_pixel_value(value_range):
  expected = images.to_float(ALL_VALUES, value_range)
  q = QuantizedImages(ALL_VALUES, value_range)
  np.testing.assert_array_equal(q[np.arange(16)], expected)
  np.testing.assert_array_equal(np.asarray(q), expected)
  rows = jnp.asarray([3, 0, 15])
  on_device = jax.jit(lambda data, r: data[r])(jax.tree.map(jnp.asarray, q), rows)
  np.testing.assert_array_equal(np.asarray(on_device), expected[np.asarray(rows)])
  np.testing.assert_array_equal(np.asarray(scale(jnp.asarray(ALL_VALUES), value_range)),
                                expected)
  assert q.shape == (16, 4, 4, 1) and q.dtype == np.float32 and len(q) == 16


def test_only_uint8_pixels_and_known_ranges():
  with pytest.raises(ValueError, match="uint8"):
    QuantizedImages(ALL_VALUES.astype(np.float32))
  with pytest.raises(ValueError, match="value_range"):
    QuantizedImages(ALL_VALUES, "centered")


def _datasets(num_clients=8, per_client=12):
  r = np.random.default_rng(0)
  n = num_clients * per_client
  y = r.integers(0, 3, n)
  raw = np.clip(r.normal(80 * y[:, None, None, None], 40, (n, 16, 16, 1)), 0, 255)
  raw = raw.astype(np.uint8)
  pools = np.arange(n).reshape(num_clients, per_client)
  train, test = [p[:9] for p in pools], [p[9:] for p in pools]
  quantized = FederatedData.from_client_indices("q", QuantizedImages(raw), y, train, test, 3)
  dense = FederatedData.from_client_indices("f", images.to_float(raw), y, train, test, 3)
  return quantized, dense


def _run(data, executor="vmap", mesh=None, rounds=2):
  model = make_model("cnn", data.sample_shape, data.num_classes, hidden_dim=16)
  spec = LocalSpec(learning_rate=0.1, batch_size=3, local_epochs=1, steps_per_epoch=3)
  eng = engine_lib.Engine(make_algorithm("FedAvg", model, spec),
                          engine_lib.DeviceData.from_federated(data),
                          engine_lib.Participation(data.num_clients, 0.75), executor=executor,
                          mesh=mesh)
  root = rng.root_key(0)
  server, clients = eng.init(root, data.x[0])
  for r in range(rounds):
    server, clients, _ = eng.run_round(server, clients, root, r)
  return eng, server, eng.evaluate(server, clients, root, rounds)


@pytest.mark.parametrize("executor,devices", [("vmap", 1), ("vmap", 8)])
def test_a_run_on_uint8_pixels_is_the_run_on_their_float_copy(executor, devices):
  quantized, dense = _datasets()
  mesh = engine_lib.client_mesh(devices) if devices > 1 else None
  eng, server_q, metrics_q = _run(quantized, executor, mesh)
  _, server_f, metrics_f = _run(dense, executor, mesh)
  jax.tree.map(np.testing.assert_array_equal, server_q, server_f)
  jax.tree.map(np.testing.assert_array_equal, metrics_q, metrics_f)
  (pixels,) = jax.tree.leaves(eng.data.x)  # one byte per pixel on the device
  assert pixels.dtype == jnp.uint8 and pixels.nbytes == quantized.x.raw.size


def test_pfllib_writer_stores_the_scaled_images(tmp_path):
  quantized, dense = _datasets(num_clients=2)
  write_pfllib_folder(quantized, tmp_path / "q")
  back = read_pfllib_folder(tmp_path / "q")
  for client in range(2):
    for split in ("train", "test"):
      x, y = quantized.client_arrays(client, split)
      assert x.dtype == np.float32
      for other in (dense, back):
        np.testing.assert_array_equal(x, other.client_arrays(client, split)[0])
        np.testing.assert_array_equal(y, other.client_arrays(client, split)[1])


def test_a_tfds_image_set_runs_from_the_cli_on_uint8_pixels(tmp_path, capsys):
  """mnist through tfds's mock data: the uint8 path through build, checks and the engine."""
  with tfds.testing.mock_data(num_examples=40):
    code = cli.main(["-data", "mnist", "-nc", "4", "--partition", "iid", "--balance", "-m", "cnn",
                     "-gr", "1", "-lbs", "5", "--data-dir", str(tmp_path / "tfds"),
                     "--out", str(tmp_path / "out"), "--no-progress", "--no-plot"])
  captured = capsys.readouterr()
  assert code in (0, None), captured.err
  assert "last test accuracy" in captured.out

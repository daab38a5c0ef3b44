"""Generators for FedKTL: the protocol, fit_images, the VAE, folders, the CLI, sample-photos."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from fedjax_lib import generators
from fedjax_lib import results
from fedjax_lib.data import FederatedData
from fedjax_lib.data import write_pfllib_folder
from fedjax_lib.errors import ConfigError
from fedjax_lib.errors import DataError
from fedjax_lib.generators import __main__ as generators_cli
from fedjax_lib.generators import photos
from fedjax_lib.generators import train
from fedjax_lib.generators import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"w_dim": 4, "resolution": 16, "channels": 3, "width": 4}
TINY_FLAGS = ["--w-dim", "4", "--resolution", "16", "--width", "4", "--num-photos", "64",
              "--batch-size", "16", "--no-progress"]


# Decoding under jit: op by op, every first call compiles each operation separately.
decode_jit = jax.jit(lambda generator, params, w: generator.decode(params, w),
                     static_argnums=0)


# ----------------------------------------------------------------------------- references


def triangle_weights(in_size, out_size):
  """Antialiased linear resize weights, computed pixel by pixel from the definition: output
  pixel i at u = (i + 1/2)·in/out − 1/2 weighs input pixel j by max(0, 1 − |u − j| / k),
  k = max(in/out, 1), normalised."""
  k = max(in_size / out_size, 1.0)
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    u = (i + 0.5) * in_size / out_size - 0.5
    for j in range(in_size):
      weights[i, j] = max(0.0, 1.0 - abs(u - j) / k)
    weights[i] /= weights[i].sum()
  return weights


def numpy_resize(image, height, width):
  """[H, W, C] -> [height, width, C] by separable triangle weights."""
  rows, cols = triangle_weights(image.shape[0], height), triangle_weights(image.shape[1], width)
  return np.einsum("ih,hwc,jw->ijc", rows, image, cols)


# ----------------------------------------------------------------------------- fit_images


def test_fit_images_constant_image_stays_constant():
  images = np.full((2, 64, 48, 3), 0.3, np.float32)
  for shape in [(32, 32, 3), (32, 32, 1), (16, 24, 3), (96, 96, 1)]:
    out = np.asarray(generators.fit_images(images, shape))
    assert out.shape == (2, *shape) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.3, atol=1e-6)


def test_fit_images_channels():
  rng = np.random.default_rng(0)
  rgb = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(generators.fit_images(rgb, (8, 8, 1)),
                             rgb.mean(-1, keepdims=True), atol=1e-6)
  gray = rgb[..., :1]
  np.testing.assert_array_equal(generators.fit_images(gray, (8, 8, 3)),
                                np.repeat(gray, 3, axis=-1))
  np.testing.assert_array_equal(generators.fit_images(rgb, (8, 8, 3)), rgb)
  with pytest.raises(ConfigError, match="2-channel"):
    generators.fit_images(rgb[..., :2], (8, 8, 3))
  with pytest.raises(ConfigError, match=r"\[n, H, W, C\]"):
    generators.fit_images(rgb[0], (8, 8, 3))
  with pytest.raises(ConfigError, match="shape"):
    generators.fit_images(rgb, (8, 8))


def test_fit_images_64x48_to_32x32_is_resize_then_centre_crop():
  # Shorter side 48 -> 32, longer 64 -> floor(32 * 64 / 48) = 42; rows 5..36 are kept
  # (offset round((42 - 32) / 2) = 5), all 32 columns.
  rng = np.random.default_rng(1)
  image = rng.uniform(-1, 1, (64, 48, 3))
  expected = numpy_resize(image, 42, 32)[5:37]
  out = np.asarray(generators.fit_images(image[None].astype(np.float32), (32, 32, 3)))[0]
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_fit_images_non_square_target_and_upsampling():
  rng = np.random.default_rng(2)
  image = rng.uniform(-1, 1, (40, 40, 1))
  # (16, 32) needs the larger scale on the width: 40x40 -> 32x32, rows 8..23.
  out = np.asarray(generators.fit_images(image[None].astype(np.float32), (16, 32, 1)))[0]
  np.testing.assert_allclose(out, numpy_resize(image, 32, 32)[8:24], atol=1e-5)
  small = rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
  up = np.asarray(generators.fit_images(small, (16, 16, 3)))
  np.testing.assert_allclose(up[0], numpy_resize(small[0], 16, 16), atol=1e-5)
  assert up.min() >= -1 and up.max() <= 1


def test_fit_images_jits_with_static_shape():
  images = np.random.default_rng(3).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
  fit = jax.jit(generators.fit_images, static_argnums=1)
  np.testing.assert_allclose(fit(images, (32, 32, 3)),
                             generators.fit_images(images, (32, 32, 3)), atol=1e-6)


# ----------------------------------------------------------------------------- Generator


def test_vae_generator_sample_and_decode():
  generator = generators.build_generator("vae", TINY)
  assert (generator.name, generator.w_dim, generator.image_shape) == ("vae", 4, (16, 16, 3))
  params = vae.init_params(vae.resolve_config(TINY), jax.random.key(0))
  w = generator.sample(params, jax.random.key(1), 20000)
  assert w.shape == (20000, 4) and w.dtype == jnp.float32
  assert np.abs(np.asarray(w.mean(0))).max() < 0.03
  assert np.abs(np.asarray(w.std(0)) - 1).max() < 0.03
  images = decode_jit(generator, params, w[:8])
  assert images.shape == (8, 16, 16, 3) and images.dtype == jnp.float32
  assert float(images.min()) >= -1 and float(images.max()) <= 1


def test_generator_is_hashable_and_a_static_argument_compiled_once():
  first = generators.build_generator("vae", TINY)
  second = generators.build_generator("vae", dict(TINY))
  assert first == second and hash(first) == hash(second)
  params = vae.init_params(vae.resolve_config(TINY), jax.random.key(0))
  traces = []

  def draw(generator, params, key):
    traces.append(1)
    return generator.decode(params, generator.sample(params, key, 3))

  draw_jit = jax.jit(draw, static_argnums=0)
  a = draw_jit(first, params, jax.random.key(2))
  b = draw_jit(second, params, jax.random.key(2))
  assert len(traces) == 1
  np.testing.assert_array_equal(a, b)
  assert generators.build_generator("vae", {**TINY, "w_dim": 5}) != first


def test_generator_validates_its_fields():
  prior = vae.build(vae.resolve_config(TINY)).sample_fn
  with pytest.raises(ConfigError, match="w_dim"):
    generators.Generator("g", 0, (4, 4, 1), prior, prior)
  with pytest.raises(ConfigError, match="image_shape"):
    generators.Generator("g", 4, (4, 4), prior, prior)
  with pytest.raises(ConfigError, match="decode_fn"):
    generators.Generator("g", 4, (4, 4, 1), prior, None)
  assert generators.Generator("g", 4, [4, 4, 1], prior, prior).image_shape == (4, 4, 1)


def test_vae_config_is_validated():
  assert vae.resolve_config({}) == {"w_dim": 64, "resolution": 32, "channels": 3, "width": 16}
  for config, match in [({"resolution": 20}, "resolution=20"), ({"channels": 2}, "channels"),
                        ({"w_dim": 0}, "w_dim"), ({"width": True}, "width"),
                        ({"depth": 3}, "unknown"), ([], "dict")]:
    with pytest.raises(ConfigError, match=match):
      generators.build_generator("vae", config)
  with pytest.raises(ConfigError, match="unknown generator kind 'gan'; accepted: vae"):
    generators.build_generator("gan", {})


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_vae_shapes_at_every_resolution(resolution):
  config = vae.resolve_config({"w_dim": 3, "resolution": resolution, "channels": 1, "width": 2})
  params = jax.eval_shape(lambda: vae.init_params(config, jax.random.key(0)))
  images = jax.eval_shape(vae.build(config).decode, params, jax.ShapeDtypeStruct((2, 3),
                                                                               jnp.float32))
  assert images.shape == (2, resolution, resolution, 1)
  mean, log_var = jax.eval_shape(
      vae.modules(config)[0].apply, {"params": params["encoder"]},
      jax.ShapeDtypeStruct((2, resolution, resolution, 1), jnp.float32))
  assert mean.shape == log_var.shape == (2, 3)


def test_kl_and_negative_elbo_match_the_formula():
  mean = jnp.array([[1.0, 0.0]])
  log_var = jnp.array([[0.0, math.log(2.0)]])
  expected = 0.5 * ((1 + 1 - 1 - 0) + (0 + 2 - 1 - math.log(2.0)))
  np.testing.assert_allclose(vae.kl_to_standard_normal(mean, log_var), [expected], rtol=1e-6)
  config = vae.resolve_config(TINY)
  params = vae.init_params(config, jax.random.key(0))
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (5, 16, 16, 3)), jnp.float32)
  loss, metrics = jax.jit(lambda p, x: vae.negative_elbo(config, p, x, jax.random.key(1),
                                                          beta=0.25))(params, images)
  np.testing.assert_allclose(loss, metrics["reconstruction"] + 0.25 * metrics["kl"],
                             rtol=1e-6)
  assert float(metrics["kl"]) >= 0 and float(metrics["reconstruction"]) > 0


def test_batch_indices_are_epochs_of_permutations():
  key = jax.random.key(0)
  rows = [np.asarray(train.batch_indices(key, jnp.int32(s), 10, 3)) for s in range(6)]
  first_epoch, second_epoch = np.concatenate(rows[:3]), np.concatenate(rows[3:])
  assert len(set(first_epoch)) == 9 and len(set(second_epoch)) == 9
  assert not np.array_equal(first_epoch, second_epoch)
  np.testing.assert_array_equal(rows[4], train.batch_indices(key, jnp.int32(4), 10, 3))


# ----------------------------------------------------------------------------- from_flax_decoder


class TinyDecoder(nn.Module):
  """Dense -> 4x4x1, scaled so that some outputs leave [-1, 1]; `decode` is a second head."""

  @nn.compact
  def __call__(self, w):
    return 10.0 * nn.Dense(16, name="to_image")(w).reshape(-1, 4, 4, 1)

  def decode(self, w):
    return jnp.tanh(self.__call__(w))


def test_from_flax_decoder_wraps_a_linen_module():
  module = TinyDecoder()
  variables = module.init(jax.random.key(0), jnp.zeros((1, 3)))
  generator = generators.from_flax_decoder(module, 3, (4, 4, 1), name="tiny")
  assert generator == generators.from_flax_decoder(TinyDecoder(), 3, (4, 4, 1), name="tiny")
  w = generator.sample(variables, jax.random.key(1), 6)
  assert w.shape == (6, 3)
  raw = module.apply(variables, w)
  assert float(jnp.abs(raw).max()) > 1  # the adapter's clip is exercised
  np.testing.assert_allclose(generator.decode(variables, w), jnp.clip(raw, -1, 1), atol=1e-6)
  jitted = jax.jit(lambda g, v, x: g.decode(v, x), static_argnums=0)
  np.testing.assert_allclose(jitted(generator, variables, w), jnp.clip(raw, -1, 1), atol=1e-6)
  with_method = generators.from_flax_decoder(module, 3, (4, 4, 1), method="decode")
  np.testing.assert_allclose(with_method.decode(variables, w),
                             module.apply(variables, w, method="decode"), atol=1e-6)
  fitted = generators.fit_images(generator.decode(variables, w), (8, 8, 3))
  assert fitted.shape == (6, 8, 8, 3)


def test_from_flax_decoder_errors():
  module = TinyDecoder()
  variables = module.init(jax.random.key(0), jnp.zeros((1, 3)))
  wrong = generators.from_flax_decoder(module, 3, (8, 8, 1))
  with pytest.raises(ConfigError, match=r"returned shape \(2, 4, 4, 1\).*expected \(2, 8, 8, 1\)"):
    wrong.decode(variables, jnp.zeros((2, 3)))
  with pytest.raises(ConfigError, match="flax.linen.Module"):
    generators.from_flax_decoder(lambda v, w: w, 3, (4, 4, 1))
  with pytest.raises(ConfigError, match="image_shape"):
    generators.from_flax_decoder(module, 3, (4, 4))


# ----------------------------------------------------------------------------- sample-photos


def test_sample_photos_is_deterministic_in_range():
  a = photos.sample_photos(16, resolution=16, seed=3)
  b = photos.sample_photos(16, resolution=16, seed=3)
  c = photos.sample_photos(16, resolution=16, seed=4)
  assert a.shape == (16, 16, 16, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
  with pytest.raises(DataError, match="max_size"):
    photos.sample_photos(4, max_size=500)
  with pytest.raises(DataError, match="num_crops"):
    photos.sample_photos(0)


def test_photos_resize_filter_is_jax_image_resize():
  for in_size, out_size in [(256, 32), (48, 32), (20, 32)]:
    image = np.random.default_rng(in_size).uniform(size=(in_size, in_size)).astype(np.float32)
    matrix = photos.triangle_resize_matrix(in_size, out_size)
    np.testing.assert_allclose(matrix @ image @ matrix.T,
                               jax.image.resize(image, (out_size, out_size), "linear",
                                                antialias=True), atol=1e-5)


def test_load_training_images_names_and_channels():
  gray = train.load_training_images("sample-photos", 16, 1, num_photos=4)
  assert gray.shape == (4, 16, 16, 1)
  digits = train.load_training_images("digits", 16)
  assert digits.shape == (1797, 16, 16, 1) and digits.min() >= -1 and digits.max() <= 1
  with pytest.raises(DataError, match="unknown --data 'nope'.*sample-photos.*digits32"):
    train.load_training_images("nope", 16)


def test_load_training_images_from_a_pfllib_folder(tmp_path):
  x = np.random.default_rng(0).uniform(-1, 1, (12, 8, 8, 3)).astype(np.float32)
  data = FederatedData.from_client_indices(
      "toy", x, np.arange(12) % 2, [np.arange(0, 4), np.arange(6, 10)],
      [np.arange(4, 6), np.arange(10, 12)], 2)
  write_pfllib_folder(data, tmp_path / "toy")
  images = train.load_training_images(str(tmp_path / "toy"), 16, 1)
  assert images.shape == (12, 16, 16, 1)  # every client's train and test images
  np.testing.assert_allclose(np.sort(images.mean(axis=(1, 2, 3))),
                             np.sort(x.mean(axis=(1, 2, 3))), atol=1e-5)


# ----------------------------------------------------------------------------- training, folders


@pytest.fixture(scope="module")
def tiny_run():
  images = photos.sample_photos(128, resolution=16, seed=0)
  checkpoints = []
  params = generators.train_generator(
      images, steps=30, batch_size=16, lr=3e-3, w_dim=4, resolution=16, seed=0, beta=1.0,
      progress=False, width=4, checkpoint_every=10,
      on_checkpoint=lambda step, params, metrics: checkpoints.append((step, metrics)))
  return images, params, checkpoints


def test_train_generator_lowers_the_loss(tiny_run):
  images, params, checkpoints = tiny_run
  config = vae.resolve_config(TINY)
  start = vae.init_params(config, jax.random.fold_in(jax.random.key(0), 0))
  loss = jax.jit(lambda p: vae.negative_elbo(config, p, jnp.asarray(images),
                                             jax.random.key(9))[0])
  assert float(loss(params)) < 0.9 * float(loss(start))
  assert [step for step, _ in checkpoints] == [10, 20, 30]
  assert checkpoints[-1][1]["loss"] < checkpoints[0][1]["loss"]


def test_save_load_round_trip_decodes_identically(tiny_run, tmp_path):
  _, params, _ = tiny_run
  folder = tmp_path / "gen"
  generators.save_generator(str(folder), "vae", TINY, params, info={"note": "test"})
  assert sorted(os.listdir(folder)) == ["generator.json", "params"]
  content = json.loads((folder / "generator.json").read_text())
  assert content["kind"] == "vae" and content["format"] == 1 and content["config"] == TINY
  generator, loaded = generators.load_generator(str(folder))
  assert generator == generators.build_generator("vae", TINY)
  w = generator.sample(loaded, jax.random.key(5), 7)
  np.testing.assert_array_equal(decode_jit(generator, loaded, w),
                                decode_jit(generator, params, w))
  # Saving again replaces the generator.
  other = jax.tree.map(lambda x: np.asarray(x) + 1.0, params)
  generators.save_generator(str(folder), "vae", TINY, other)
  np.testing.assert_array_equal(generators.load_generator(str(folder))[1]["decoder"]
                                ["Dense_0"]["bias"], other["decoder"]["Dense_0"]["bias"])


def test_save_generator_errors(tiny_run, tmp_path):
  _, params, _ = tiny_run
  with pytest.raises(ConfigError, match="unknown generator kind"):
    generators.save_generator(str(tmp_path / "a"), "gan", TINY, params)
  with pytest.raises(ConfigError, match="Dense_0.*shape"):
    generators.save_generator(str(tmp_path / "b"), "vae", {**TINY, "w_dim": 5}, params)
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match="not a generator folder"):
    generators.save_generator(str(tmp_path / "c"), "vae", TINY, params)
  assert sorted(os.listdir(tmp_path)) == ["c"]


def test_an_interrupted_save_is_refused_then_replaced(tiny_run, tmp_path):
  _, params, _ = tiny_run
  folder = tmp_path / "gen"
  generators.save_generator(str(folder), "vae", TINY, params)
  # What a save killed after removing generator.json and before writing the new one leaves.
  os.remove(folder / "generator.json")
  shutil.copytree(folder / "params", folder / "params.new")
  (folder / "params.new.orbax-checkpoint-tmp-1").mkdir()  # and Orbax's own, killed earlier
  with pytest.raises(ConfigError, match="no generator.json"):
    generators.load_generator(str(folder))
  generators.save_generator(str(folder), "vae", TINY, params)
  assert sorted(os.listdir(folder)) == ["generator.json", "params"]
  generators.load_generator(str(folder))


def one_line_error(path):
  with pytest.raises(ConfigError) as info:
    generators.load_generator(str(path))
  message = str(info.value)
  assert "\n" not in message and str(path) in message
  return message


def test_load_generator_errors_are_one_line(tiny_run, tmp_path, capfd):
  _, params, _ = tiny_run
  assert "does not exist" in one_line_error(tmp_path / "missing")
  (tmp_path / "file").write_text("x")
  assert "not a folder" in one_line_error(tmp_path / "file")
  (tmp_path / "empty").mkdir()
  assert "no generator.json" in one_line_error(tmp_path / "empty")

  def saved(name):
    folder = tmp_path / name
    generators.save_generator(str(folder), "vae", TINY, params)
    return folder

  corrupt = saved("corrupt-json")
  (corrupt / "generator.json").write_text("{not json")
  assert "cannot read" in one_line_error(corrupt)
  for name, content, match in [("no-kind", {"config": TINY, "format": 1}, "needs the keys"),
                               ("list", [1, 2], "needs the keys"),
                               ("future", {"kind": "vae", "config": TINY, "format": 99},
                                "format 99"),
                               ("gan", {"kind": "gan", "config": {}, "format": 1},
                                "unknown generator kind 'gan'"),
                               ("bad-config", {"kind": "vae", "config": {"resolution": 20},
                                               "format": 1}, "resolution=20"),
                               ("other-shape", {"kind": "vae", "config": {**TINY, "w_dim": 8},
                                                "format": 1}, "parameters|shape")]:
    folder = saved(name)
    (folder / "generator.json").write_text(json.dumps(content))
    assert re.search(match, one_line_error(folder)), name
  no_params = saved("no-params")
  shutil.rmtree(no_params / "params")
  assert "no params/" in one_line_error(no_params)
  damaged = saved("damaged")
  for directory, _, files in os.walk(damaged / "params"):
    for name in files:
      with open(os.path.join(directory, name), "wb") as f:
        f.write(b"\x00garbage")
  assert "cannot read the parameters" in one_line_error(damaged)
  err = capfd.readouterr().err
  assert "Traceback" not in err


# ----------------------------------------------------------------------------- the command


def run_main(argv, capsys):
  try:
    status = generators_cli.main(argv)
  except SystemExit as e:  # argparse's own errors
    status = e.code
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def test_cli_end_to_end(tmp_path):
  out = tmp_path / "gen"
  result = subprocess.run(
      [sys.executable, "-m", "fedjax_lib.generators", "train", "--data", "sample-photos",
       "--out", str(out), "--steps", "5", "--checkpoint-every", "2", *TINY_FLAGS],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert "final loss" in result.stdout and str(out / "samples.png") in result.stdout
  assert sorted(os.listdir(out)) == ["generator.json", "params", "reconstructions.png",
                                     "samples.png"]
  samples = matplotlib.image.imread(out / "samples.png")
  rebuilt = matplotlib.image.imread(out / "reconstructions.png")
  assert samples.shape[0] == samples.shape[1] > 8 * 16 and samples.std() > 0
  assert rebuilt.shape == samples.shape
  generator, params = generators.load_generator(str(out))
  assert generator.image_shape == (16, 16, 3) and generator.w_dim == 4
  info = json.loads((out / "generator.json").read_text())["info"]
  assert info["step"] == 5 and info["training"]["data"] == "sample-photos"
  assert math.isfinite(info["loss"])


@pytest.mark.parametrize("flags,match", [
    (["--data", "nope"], "unknown --data 'nope'"),
    (["--steps", "0"], "--steps 0 must be an int >= 1"),
    (["--resolution", "20"], "--resolution 20 is not supported; accepted: 16, 32, 64"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--beta", "nan"], "--beta nan"),
    (["--batch-size", "100"], "--batch-size 100 is larger than the 64 images"),
    (["--channels", "2"], "argument --channels"),
    (["--steps", "x"], "argument --steps"),
    (["--seed", "-1"], "--seed -1 must be an int in [0, 4294967295]"),
    (["--width", "257"], "--width 257 must be an int in [1, 256]"),
    (["--w-dim", "65537"], "--w-dim 65537 must be an int in [1, 65536]"),
    (["--steps", "2147483648"], "--steps 2147483648 must be an int in [1, 2147483647]"),
    (["--num-photos", "2147483647"], "num_crops=2147483647 at resolution 16 needs"),
    (["--seed", "4294967296"], "--seed 4294967296 must be an int in [0, 4294967295]"),
    (["--data", str(os.path.join(ROOT, "tests", "no-such-folder"))], "does not exist"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(flags, match, tmp_path,
                                                                capsys):
  out = tmp_path / "gen"
  argv = ["train", "--data", "sample-photos", "--out", str(out), *TINY_FLAGS, *flags]
  status, stdout, stderr = run_main(argv, capsys)
  assert status == 2
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], stderr
  assert stdout == "" and not out.exists()


def test_cli_refuses_an_existing_folder_that_is_not_a_generator(tmp_path, capsys):
  out = tmp_path / "results"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  status, _, stderr = run_main(["train", "--data", "sample-photos", "--out", str(out),
                                *TINY_FLAGS], capsys)
  assert status == 2 and "not a generator folder" in stderr
  assert len(stderr.strip().splitlines()) == 1
  assert os.listdir(out) == ["notes.txt"]
  (tmp_path / "file").write_text("x")
  status, _, stderr = run_main(["train", "--data", "sample-photos", "--out",
                                str(tmp_path / "file"), *TINY_FLAGS], capsys)
  assert status == 2 and "is a file" in stderr


def test_cli_bad_input_through_python_m(tmp_path):
  out = tmp_path / "gen"
  result = subprocess.run(
      [sys.executable, "-m", "fedjax_lib.generators", "train", "--data", "sample-photos",
       "--out", str(out), "--resolution", "20"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip().splitlines() == [
      "error: --resolution 20 is not supported; accepted: 16, 32, 64"]
  assert not out.exists()


def test_image_grid_places_tiles():
  images = np.stack([np.full((4, 4, 1), v, np.float32) for v in (-1.0, 1.0, 0.0)])
  grid = results.image_grid(images, columns=2, min_side=8, gap=1)  # tiles 8x8, 2x2 slots
  assert grid.shape == (2 * 8 + 1, 2 * 8 + 1, 3) and grid.dtype == np.uint8
  assert (grid[0:8, 0:8] == 0).all() and (grid[0:8, 9:17] == 255).all()
  assert (grid[9:17, 0:8] == 128).all() and (grid[9:17, 9:17] == 255).all()
  assert (grid[8] == 255).all() and (grid[:, 8] == 255).all()  # the gaps


def test_cli_out_of_memory_is_one_error_line(monkeypatch, tmp_path, capsys):
  from tests.test_cli import xla_out_of_memory  # pylint: disable=import-outside-toplevel
  error = xla_out_of_memory()

  def fail(options):
    raise error
  monkeypatch.setattr(generators_cli.train, "train_to_folder", fail)
  out = tmp_path / "gen"
  status, stdout, stderr = run_main(["train", "--data", "sample-photos", "--out", str(out)],
                                    capsys)
  lines = stderr.strip().splitlines()
  assert status == 2 and len(lines) == 1 and stdout == "" and not out.exists()
  assert lines[0].startswith("error: out of memory (RESOURCE_EXHAUSTED") and "--w-dim" in lines[0]

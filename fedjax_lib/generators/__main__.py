"""``python -m fedjax_lib.generators train --data NAME --out DIR [options]``.

Parses the flags into a `train.TrainOptions` and runs `train.train_to_folder`. Bad input
prints one line ``error: ...`` on stderr and exits with status 2, having written nothing;
Ctrl-C exits with 130 and keeps the last checkpoint (``--checkpoint-every``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from fedjax_lib import versions
from fedjax_lib.errors import FedJaxError, exit_out_of_memory
from fedjax_lib.generators import train


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line and exit with status 2."""

  def error(self, message: str):
    self.exit(2, f"error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows the defaults of the options that take a value."""

  def _get_help_string(self, action: argparse.Action) -> str:
    if action.required or action.nargs == 0:
      return action.help or ""
    return super()._get_help_string(action)


def _channels(text: str):
  if text == "auto":
    return text
  if text in ("1", "3"):
    return int(text)
  raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from auto, 1, 3)")


def build_parser() -> argparse.ArgumentParser:
  """The command line: one subcommand, ``train``."""
  parser = _Parser(prog="python -m fedjax_lib.generators", allow_abbrev=False,
                   description="Generators for FedKTL: train the built-in VAE.")
  commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  train = commands.add_parser(
      "train", allow_abbrev=False, formatter_class=_HelpFormatter,
      help="train the built-in VAE generator and write its folder",
      description="Train the built-in VAE generator on a dataset and write a generator folder "
                  "(generator.json, params/, samples.png, reconstructions.png) that "
                  "load_generator and FedKTL's -GPath read.")
  add = train.add_argument
  add("--data", required=True,
      help="sample-photos, a built-in dataset (digits, digits32, ...) or a PFLlib folder")
  add("--out", required=True, help="the generator folder to write (new, empty, or a "
      "generator folder to replace)")
  add("--steps", type=int, default=2000, help="training steps")
  add("--batch-size", type=int, default=64, help="images per step")
  add("--lr", type=float, default=1e-3, help="Adam learning rate")
  add("--w-dim", type=int, default=64, help="latent width")
  add("--resolution", type=int, default=32, help="image side: 16, 32 or 64")
  add("--channels", type=_channels, default="auto", help="auto (the data's), 1 or 3")
  add("--seed", type=int, default=0, help="seed of the initialisation, batches and crops")
  add("--beta", type=float, default=1.0, help="weight of the KL term")
  add("--width", type=int, default=16, help="base channel width of the VAE")
  add("--num-photos", type=int, default=4096, help="number of crops for sample-photos")
  add("--checkpoint-every", type=int, default=500,
      help="save the folder every so many steps (0: only at the end)")
  add("--no-progress", dest="progress", action="store_false", help="no progress bar")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (0; 2 for bad input; 130 when stopped)."""
  problem = versions.problem()
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  args = build_parser().parse_args(argv)
  fields = {name: value for name, value in vars(args).items() if name != "command"}
  try:
    train.train_to_folder(train.TrainOptions(**fields))
  except FedJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (MemoryError, RuntimeError) as e:  # (JAX's runtime errors are RuntimeErrors)
    return exit_out_of_memory(e, "lower --w-dim, --width, --batch-size, --resolution or "
                              "--num-photos")
  except KeyboardInterrupt:
    print(f"stopped: {args.out} holds the last checkpoint, if one was saved "
          "(--checkpoint-every)", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""``python -m fedjax_lib``: the signal handlers come first, before JAX is imported."""

import sys

from fedjax_lib.stopping import STOPPER

STOPPER.install(exit_now=True)

from fedjax_lib.cli import main  # pylint: disable=wrong-import-position

sys.exit(STOPPER.finish(main()))

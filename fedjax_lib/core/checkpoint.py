"""Orbax checkpoints of one run: states, the next round, the metrics history and the config.

A checkpoint at step ``s`` holds everything needed to continue with round ``s``: the state
``{"server": server_state, "clients": {architecture: stacked client states}}`` (every
algorithm-specific leaf included; each architecture group's real clients, whatever the device
count), and a JSON item with the history so far, the config, the run's seed and the format
version (:data:`FORMAT`).

Formats: 2 (architecture groups) is written. 1 (before groups: ``"clients"`` one stacked
tree) is restored into a one-architecture run; for several architectures it is refused with a
one-line error. Nothing random is stored: every key
derives from ``(seed, round, client id)``, so a resumed run is identical to an uninterrupted
one. Saves are synchronous and atomic (Orbax writes a temporary directory and renames it when
complete), so a run killed mid-save leaves the previous checkpoint as the latest complete one;
a checkpoint that cannot be read is moved aside (``<step>.unreadable``) with a warning in favour
of the one before it.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from fedjax_lib.errors import ConfigError

FORMAT = 2
READABLE_FORMATS = (1, 2)


class RunCheckpointer:
  """Saves and restores the checkpoints of one run in ``directory`` (keeps the last ``keep``)."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, server_state, client_states, meta: dict) -> str:
    """Writes checkpoint ``step`` (the round to continue with); returns its path."""
    state = {"server": server_state, "clients": client_states}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({**meta, "format": FORMAT, "step": step})), force=True)
    self.manager.wait_until_finished()
    return self.path(step)

  def restore_latest(self, server_state, client_states) -> Optional[tuple[int, Any, Any, dict]]:
    """``(step, server_state, client_states, meta)`` of the newest readable checkpoint, or None.

    ``server_state``/``client_states`` (``{architecture: states}``) give the structure,
    shapes and dtypes to restore into.

    Raises:
      ConfigError: the checkpoint's format cannot be restored into these states.
    """
    for step in reversed(self.steps()):
      try:
        meta = dict(self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)
        self._check_format(meta, step, client_states)
        clients = client_states
        if meta["format"] == 1:  # one architecture's stacked states, not keyed by group
          (clients,) = client_states.values()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                {"server": server_state, "clients": clients})
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        aside = f"{self.path(step)}.unreadable"
        warnings.warn(f"checkpoint {self.path(step)} could not be read ({type(e).__name__}: "
                      f"{str(e)[:200]}); moved it to {aside} and trying the previous one",
                      stacklevel=2)
        if not os.path.exists(aside):
          os.replace(self.path(step), aside)
        self.manager.reload()
        continue
      clients = restored.state["clients"]
      if meta["format"] == 1:
        clients = {next(iter(client_states)): clients}
      return step, restored.state["server"], clients, meta
    return None

  def _check_format(self, meta: dict, step: int, client_states) -> None:
    if meta.get("step") != step:
      raise ValueError(f"unexpected metadata {sorted(meta)}")
    fmt = meta.get("format")
    if fmt not in READABLE_FORMATS:
      raise ConfigError(f"the checkpoint {self.path(step)} has format {fmt!r}; this version "
                        f"reads formats {', '.join(map(str, READABLE_FORMATS))}; use another "
                        "--out or the version that wrote it")
    if fmt == 1 and len(client_states) != 1:
      raise ConfigError(f"the checkpoint {self.path(step)} has format 1 (one architecture, "
                        f"written before architecture groups) but this run has "
                        f"{len(client_states)} architectures ({', '.join(client_states)}); "
                        "use another --out")

  def latest_meta(self) -> Optional[dict]:
    """The JSON item of the newest readable checkpoint (no arrays are read), or None."""
    for step in reversed(self.steps()):
      try:
        meta = dict(self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)
      except Exception:  # pylint: disable=broad-except
        continue
      if meta.get("format") in READABLE_FORMATS:
        return meta
    return None

  def close(self) -> None:
    self.manager.close()

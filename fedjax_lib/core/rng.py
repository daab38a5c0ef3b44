"""PRNG key derivation: keys, not seeds.

One root key comes from the run's seed. Every random event of a round derives from
``round_key = fold_in(root, round)`` and, for a client, from its *id* (never its position in
the cohort), through a separate stream tag so that streams never collide::

    root ──fold_in(round)──> round_key ──fold_in(SELECT)──> selection / drop-outs
                                      ├──fold_in(CLIENT)──fold_in(client_id)──> local training
                                      ├──fold_in(SERVER)──> server update
                                      ├──fold_in(RECEIVE)──fold_in(CLIENT)──fold_in(client_id)
                                      │      ──> what every client does with the new server
                                      │      state (FedALA)
                                      └──fold_in(EVAL)──fold_in(client_id)──> evaluation
    root ──fold_in(INIT)──> model / state initialisation (the first architecture group)
                         └──fold_in(g)──> the group at position g ≥ 1, unless an earlier
                                          group has the same model (then that group's key)
    root ──fold_in(WARMUP)──> an initialisation period before round 0 (FedDBE)
    root ──fold_in(NEW)──fold_in(client_id)──> fine-tuning of new clients

Inside local training (`fedjax_lib.core.local`), step ``t`` of a client uses
``step_key = fold_in(loss_key, t)``; with DP-SGD on, example ``b`` of the step's batch gets
``fold_in(fold_in(step_key, DP_EXAMPLE), b)`` for its loss and the step's Gaussian noise comes
from ``fold_in(step_key, DP_NOISE)``, independent of every loss-side draw.

Same seed, same platform, same config ⇒ the same numbers, whatever the executor or cohort order.
"""

import jax

# Stream tags (arbitrary distinct constants).
INIT = 0x1A17
SELECT = 0x5E1
CLIENT = 0xC11E
SERVER = 0x5E4
EVAL = 0xE7A1
RECEIVE = 0x4EC5
WARMUP = 0x3A53
NEW = 0x4E3
DP_EXAMPLE = 0xD9E8
DP_NOISE = 0xD9A0


def root_key(seed: int) -> jax.Array:
  return jax.random.key(seed)


def init_key(root: jax.Array) -> jax.Array:
  return jax.random.fold_in(root, INIT)


def group_init_key(root: jax.Array, group: int) -> jax.Array:
  """The initialisation key of the architecture group at position ``group``: ``init_key``
  for group 0 (a one-architecture run is unchanged by groups), ``fold_in(init_key, group)``
  for the others (the engine passes the position of the first group with the same model).

  Every group needs its own key: Flax derives a submodule's parameters from the key and the
  submodule's path, so two architectures initialised from one key get the *same* values in
  every same-named, same-shaped submodule, e.g. the ``head``. HtFLlib draws each
  architecture's model, head included, independently; one shared head aligned the feature
  spaces of different architectures from round 0 and lifted FedProto on HtFE-img-2 by about
  0.04 over HtFLlib's (experiments/pfllib_agreement/RESULTS.md).
  """
  key = init_key(root)
  return key if group == 0 else jax.random.fold_in(key, group)


def round_key(root: jax.Array, round_index) -> jax.Array:
  return jax.random.fold_in(root, round_index)


def selection_key(rkey: jax.Array) -> jax.Array:
  return jax.random.fold_in(rkey, SELECT)


def client_key(rkey: jax.Array, client_id) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(rkey, CLIENT), client_id)


def server_key(rkey: jax.Array) -> jax.Array:
  return jax.random.fold_in(rkey, SERVER)


def receive_round_key(rkey: jax.Array) -> jax.Array:
  """The round's key of `Algorithm.receive_client` (its clients' keys fold in their ids, as
  `client_key` does)."""
  return jax.random.fold_in(rkey, RECEIVE)


def eval_key(rkey: jax.Array, client_id) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(rkey, EVAL), client_id)


def warmup_key(root: jax.Array) -> jax.Array:
  return jax.random.fold_in(root, WARMUP)


def new_client_key(root: jax.Array, client_id) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(root, NEW), client_id)


def dp_example_key(step_key: jax.Array, example) -> jax.Array:
  """The loss key of example ``example`` of a DP-SGD step (its own per-example pass)."""
  return jax.random.fold_in(jax.random.fold_in(step_key, DP_EXAMPLE), example)


def dp_noise_key(step_key: jax.Array) -> jax.Array:
  """The key of a DP-SGD step's Gaussian noise."""
  return jax.random.fold_in(step_key, DP_NOISE)

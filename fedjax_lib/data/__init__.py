"""Federated datasets: sources, PFLlib partitioners, PFLlib folders, `FederatedData`."""

from fedjax_lib.data.federated import FederatedData
from fedjax_lib.data.loading import load_federated
from fedjax_lib.data.partition import build_federated
from fedjax_lib.data.partition import least_samples
from fedjax_lib.data.partition import partition
from fedjax_lib.data.partition import SCHEMES
from fedjax_lib.data.partition import split_train_test
from fedjax_lib.data.pfllib_format import partition_meta
from fedjax_lib.data.pfllib_format import read_pfllib_folder
from fedjax_lib.data.pfllib_format import write_pfllib_folder
from fedjax_lib.data.quantized import QuantizedImages
from fedjax_lib.data.sources import BUILTIN_DATASETS
from fedjax_lib.data.sources import load_digits
from fedjax_lib.data.sources import load_tfds
from fedjax_lib.data.sources import resolve_builtin
from fedjax_lib.data.sources import synthetic

__all__ = [
    "BUILTIN_DATASETS",
    "FederatedData",
    "QuantizedImages",
    "SCHEMES",
    "build_federated",
    "least_samples",
    "load_digits",
    "load_federated",
    "load_tfds",
    "partition",
    "partition_meta",
    "read_pfllib_folder",
    "resolve_builtin",
    "split_train_test",
    "synthetic",
    "write_pfllib_folder",
]

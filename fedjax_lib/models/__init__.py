"""Model zoo: Flax models with a base (feature extractor) / head (classifier) split."""

from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.base import count_params
from fedjax_lib.models.base import feature_dim
from fedjax_lib.models.base import has_train_mode
from fedjax_lib.models.base import merge_params
from fedjax_lib.models.base import split_params
from fedjax_lib.models.cnn import FedAvgCNN
from fedjax_lib.models.cnn import FedAvgCNNBase
from fedjax_lib.models.digit5 import Digit5CNN
from fedjax_lib.models.layers import CONV_IMPLS
from fedjax_lib.models.layers import TorchConv
from fedjax_lib.models.layers import TorchDense
from fedjax_lib.models.layers import torch_fc1_permutation
from fedjax_lib.models.mlp import AmazonMLP
from fedjax_lib.models.mlp import DNN
from fedjax_lib.models.mlp import MLR
from fedjax_lib.models.pooling import AdaptiveAvgPool1d
from fedjax_lib.models.pooling import adaptive_avg_pool1d
from fedjax_lib.models.pooling import adaptive_avg_pool_bins
from fedjax_lib.models.pooling import adaptive_avg_pool_matrix
from fedjax_lib.models.sensor import harcnn
from fedjax_lib.models.text import text_model
from fedjax_lib.models.zoo import FAMILIES
from fedjax_lib.models.zoo import MODEL_NAMES
from fedjax_lib.models.zoo import architecture_of_clients
from fedjax_lib.models.zoo import dataset_architectures
from fedjax_lib.models.zoo import family_global_model
from fedjax_lib.models.zoo import init_model
from fedjax_lib.models.zoo import make_model
from fedjax_lib.models.zoo import architecture_has_train_mode
from fedjax_lib.models.zoo import model_option_names
from fedjax_lib.models.zoo import parse_model_names

__all__ = [
    'AdaptiveAvgPool1d',
    'AmazonMLP',
    'BaseHeadModel',
    'CONV_IMPLS',
    'DNN',
    'Digit5CNN',
    'FedAvgCNN',
    'FedAvgCNNBase',
    'MLR',
    'FAMILIES',
    'MODEL_NAMES',
    'TorchConv',
    'TorchDense',
    'adaptive_avg_pool1d',
    'adaptive_avg_pool_bins',
    'adaptive_avg_pool_matrix',
    'architecture_of_clients',
    'count_params',
    'dataset_architectures',
    'feature_dim',
    'harcnn',
    'architecture_has_train_mode',
    'has_train_mode',
    'init_model',
    'make_model',
    'model_option_names',
    'merge_params',
    'parse_model_names',
    'split_params',
    'text_model',
    'torch_fc1_permutation',
]

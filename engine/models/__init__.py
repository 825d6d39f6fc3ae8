"""The CNNs frmap explains: torchvision VGGs and their weights, the digits CNN, classification,
and where a model runs."""

from frmap.engine.models.digits import DigitsCNN, load_digits_model
from frmap.engine.models.predict import predict
from frmap.engine.models.runtime import (
    model_device,
    model_identity,
    one_blas_thread,
    torch_settings,
)
from frmap.engine.models.vgg import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGG_ARCHS,
    Normalized,
    load_vgg,
    load_weights,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VGG_ARCHS",
    "DigitsCNN",
    "Normalized",
    "load_digits_model",
    "load_vgg",
    "load_weights",
    "model_device",
    "model_identity",
    "one_blas_thread",
    "predict",
    "torch_settings",
]

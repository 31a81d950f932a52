"""E2E-VLP network (flax.linen): backbone, embeddings, transformer, heads."""

from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.models.resnet import ResNet
from e2e_vlp.models.resnet import resnet_stages

__all__ = ['E2EVLP', 'ResNet', 'resnet_stages']

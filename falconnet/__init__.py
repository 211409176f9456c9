"""FalconNet: LightNet, RepSO, SF-Conv and RefCO in PyTorch, running on fused kernels.

    import falconnet
    model = falconnet.create_model("falconnet", num_classes=100)
    deployed = falconnet.reparameterize_model(model.eval())
"""
from falconnet_kernels import kernels_info

from . import layers
from .models import LightNet, create_model, list_models
from .reparam import reparameterize_model

__all__ = ["create_model", "list_models", "reparameterize_model", "layers", "LightNet", "kernels_info"]

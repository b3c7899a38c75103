"""A tiny torchvision VisionTransformer for tests (random weights, 64 px)."""

import torch
from torchvision.models.vision_transformer import VisionTransformer

from builder.synthetic.planted import to_tensor


def tiny_vit():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16,
                              mlp_dim=32, num_classes=5)
    return model, to_tensor

"""A small PyTorch 3-D segmentation network that is not nnU-Net's, for model-card tests."""
import torch


def tiny_net(in_channels: int = 1, classes: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_channels, 8, 3, padding=1), torch.nn.InstanceNorm3d(8, affine=True), torch.nn.LeakyReLU(),
        torch.nn.Conv3d(8, 8, 3, stride=2, padding=1), torch.nn.InstanceNorm3d(8, affine=True), torch.nn.LeakyReLU(),
        torch.nn.ConvTranspose3d(8, 8, 2, stride=2), torch.nn.LeakyReLU(),
        torch.nn.Conv3d(8, classes, 1),
    )

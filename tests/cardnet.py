"""A small PyTorch 3-D segmentation network that is not nnU-Net's, for model-card tests."""
import torch


def tiny_net(in_channels: int = 1, classes: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_channels, 8, 3, padding=1), torch.nn.InstanceNorm3d(8, affine=True), torch.nn.LeakyReLU(),
        torch.nn.Conv3d(8, 8, 3, stride=2, padding=1), torch.nn.InstanceNorm3d(8, affine=True), torch.nn.LeakyReLU(),
        torch.nn.ConvTranspose3d(8, 8, 2, stride=2), torch.nn.LeakyReLU(),
        torch.nn.Conv3d(8, classes, 1),
    )


def sized_net(in_channels: int = 1, classes: int = 3, features: int = 8) -> torch.nn.Module:
    """tiny_net with its width as a keyword argument (a plain constructor for the card's network_kwargs)."""
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_channels, features, 3, padding=1), torch.nn.InstanceNorm3d(features, affine=True),
        torch.nn.LeakyReLU(), torch.nn.Conv3d(features, classes, 1))


def trained_norm_net(track_running_stats: bool = True) -> torch.nn.Module:
    """A network whose InstanceNorm layers keep running statistics but were trained, and are used, in training
    mode: each input normalized by its own statistics (as some published brain-extraction nets ship)."""
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.InstanceNorm3d(8, affine=True, track_running_stats=track_running_stats),
        torch.nn.LeakyReLU(), torch.nn.Conv3d(8, 3, 1))


def own_stats_net() -> torch.nn.Module:
    """trained_norm_net's function written with plain InstanceNorm (no running statistics at all)."""
    return trained_norm_net(track_running_stats=False)


class _FunctionalNorm(torch.nn.Module):
    """Instance statistics through the functional call, with running buffers: the ONNX exporter refuses it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 1)
        self.register_buffer("rm", torch.zeros(3))
        self.register_buffer("rv", torch.ones(3))

    def forward(self, x):
        return torch.nn.functional.instance_norm(self.conv(x), self.rm, self.rv, use_input_stats=True)


def functional_norm_net() -> torch.nn.Module:
    return _FunctionalNorm()


def not_a_module() -> dict:
    return {"weights": None}


class MeanSoftmax(torch.nn.Module):
    """A hand-made ensemble: the mean of several networks' softmax (what a five-fold card computes)."""

    def __init__(self, nets):
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)

    def forward(self, x):
        return torch.stack([torch.softmax(n(x), dim=1) for n in self.nets]).mean(0)


def mean_softmax_of(folder: str, folds: int = 5) -> torch.nn.Module:
    """MeanSoftmax over FOLDER/fold_N.pt of sized_net(features=4)."""
    import os
    nets = []
    for f in range(folds):
        net = sized_net(features=4)
        net.load_state_dict(torch.load(os.path.join(folder, f"fold_{f}.pt"), weights_only=True))
        nets.append(net)
    return MeanSoftmax(nets)


def batch_norm_net() -> torch.nn.Module:
    """BatchNorm in training mode with no running statistics: it would normalize by each batch of tiles."""
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1), torch.nn.BatchNorm3d(4), torch.nn.Conv3d(4, 3, 1))

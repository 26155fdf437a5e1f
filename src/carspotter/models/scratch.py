"""The from-scratch CNN family of the reference study: n × [conv3x3 → (BN) → ReLU → MaxPool], then FC.

`hidden_bn` puts a BatchNorm1d between the hidden FC and its ReLU. Without it the BatchNorm networks (S2, S3,
strong-cnn-scratch) collapse to the class prior on real photos: the FC's 4,096 inputs are all positive (ReLU →
pool), so Adam's sign-like first steps move each hidden unit's pre-activation by ≈ lr · Σx for every photo at
once, and 96 % of the 256 hidden units were dead (zero for every training photo) after epoch 1 on cars-small
(scripts/diagnostics/scratch_collapse.py). BatchNorm re-centres each unit over the batch, so none can die.
"""

from __future__ import annotations

import torch
from torch import nn


class HiddenBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that normalises a training batch of one photo (e.g. an epoch's last) with its running
    statistics instead of failing: one value per unit has no batch variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


class ScratchBackbone(nn.Module):
    """Conv blocks → 4×4 adaptive average pool → flatten → FC(hidden) → ReLU. `num_features` = hidden width."""

    def __init__(
        self, channels: list[int], batchnorm: bool = False, hidden_dim: int = 256, hidden_bn: bool = False
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c, 3, padding=1, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(c))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            blocks.append(nn.Sequential(*layers))
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(4)
        flat = c_in * 16
        if hidden_dim:
            fc: list[nn.Module] = [nn.Flatten(), nn.Linear(flat, hidden_dim, bias=not hidden_bn)]
            if hidden_bn:
                fc.append(HiddenBatchNorm(hidden_dim))
            self.fc = nn.Sequential(*fc, nn.ReLU(inplace=True))
            self.num_features = hidden_dim
        else:
            self.fc = nn.Flatten()
            self.num_features = flat

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled feature map (B, C, H / 2^n, W / 2^n), as timm's `forward_features` (for CAM boxes)."""
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Feature map → (B, F), as timm's `forward_head(x, pre_logits=True)` of a headless model."""
        return self.fc(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # (B, F)


def he_init(m: nn.Module) -> None:
    """He (Kaiming) initialisation for ReLU networks, as in the reference study."""
    if isinstance(m, nn.Conv2d | nn.Linear):
        nn.init.kaiming_normal_(
            m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in", nonlinearity="relu"
        )
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

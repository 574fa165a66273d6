"""Small networks and helpers shared by the pruning tests (imported as ``from helpers import
...``: pytest puts tests/ on the path, as for ``conftest``)."""
import copy

import torch
from torch import nn

from hbgs.pruning import wrap_model


class PlainNet(nn.Module):
    """Stem, three 3×3 conv-BN-ReLU layers (``a`` 8→16, ``b`` and ``c`` 16→16), pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.a, self.b, self.c = (nn.Conv2d(i, 16, 3, padding=1, bias=False) for i in (8, 16, 16))
        self.bns = nn.ModuleList(nn.BatchNorm2d(w) for w in (8, 16, 16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        for conv, bn in zip((self.stem, self.a, self.b, self.c), self.bns):
            x = torch.relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for tensor, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2),
                                      (m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5)):
                tensor.data.copy_(torch.empty(tensor.shape).uniform_(low, high,
                                                                     generator=generator))
    return model.eval()


def wrapped(original: nn.Module) -> nn.Module:
    model = copy.deepcopy(original)
    wrap_model(model)
    return model


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

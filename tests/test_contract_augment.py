"The augmentation and mixing subscribers pass the shared contract (see tests/contract.py)."
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.losses import LabelSmoothingCrossEntropy
from nntrain.subs.augment import AugmentS, CutMixS, MixUpS
from tests.contract import check_contract, tiny_classifier


def tiny_images(n: int = 48, bs: int = 16, seed: int = 0) -> Learner:
    "Like `tiny_classifier`, on (N, 1, 4, 4) images, so CutMix has something to cut."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    dls = DataLoaders.from_tensors(x, y, x[:32], y[:32], batch_size=bs, seed=seed)
    return Learner(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), dls, F.cross_entropy, torch.optim.SGD, lr=0.1)


def tiny_images_smoothed() -> Learner:
    learn = tiny_images()
    learn.loss_func = LabelSmoothingCrossEntropy()
    return learn


SUBSCRIBERS = {
    'AugmentS': (lambda: AugmentS(lambda x: x + 0.1 * torch.randn_like(x)), tiny_classifier),
    'MixUpS': (MixUpS, tiny_classifier),
    'MixUpS+smoothing': (MixUpS, tiny_images_smoothed),
    'CutMixS': (CutMixS, tiny_images),
}

@pytest.mark.parametrize('name', sorted(SUBSCRIBERS))
def test_contract(name):
    factory, make_learner = SUBSCRIBERS[name]
    check_contract(factory, make_learner)

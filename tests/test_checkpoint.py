"""hbgs.checkpoint: one file format for trained and pruned models."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from hbgs.accounting import count_macs, count_params
from hbgs.checkpoint import (FORMAT, CheckpointError, CheckpointNotFound, load_meta,
                             load_model, save_model)
from hbgs.models import resnet20
from hbgs.pruning import AdaptedConv, fold_identity_adapters, prune_conv, wrap_model

RESNET20 = {"_target_": "hbgs.models.resnet20", "num_classes": 10}


class UserNet(nn.Module):
    """A user's own model, saved without a Hydra config (pickled)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.body(torch.relu(self.stem(x))).mean((2, 3)))


def pruned_resnet20():
    torch.manual_seed(0)
    model = resnet20(num_classes=10)
    wrap_model(model)
    prune_conv(model, "layer1.0.conv1", "out", 6)
    prune_conv(model, "layer3.0.conv2", "in", 16)
    fold_identity_adapters(model)
    return model.eval()


def test_pruned_model_round_trip_and_hand_computed_savings(tmp_path):
    original, model = resnet20(num_classes=10), pruned_resnet20()
    # layer1.0.conv1, 16→16 3×3 no bias, 6 output filters removed:
    #   conv 16·16·9 = 2304 → 10·16·9 = 1440 (−864); out-adapter 16·10 + 16 bias = 176 → −688
    # layer3.0.conv2, 64→64 3×3 no bias, 16 input channels removed:
    #   conv 64·64·9 = 36864 → 64·48·9 = 27648 (−9216); in-adapter 48·64 = 3072 → −6144
    assert count_params(original) == 269722
    assert count_params(model) == 269722 - 688 - 6144 == 262890
    # MACs at 32×32 (layer1) and 8×8 (layer3):
    #   layer1: 2304·1024 → (1440 + 160)·1024: −720896;  layer3: 36864·64 → (27648 + 3072)·64: −393216
    assert count_macs(original) - count_macs(model) == 720896 + 393216

    path = save_model(model, tmp_path / "run" / "model.pt", model_cfg=RESNET20,
                      meta={"test_acc": 0.5, "cfg": OmegaConf.create({"lr": 0.1})})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    loaded = load_model(path)
    assert not loaded.training
    assert {n for n, m in loaded.named_modules() if isinstance(m, AdaptedConv)} == \
        {"layer1.0.conv1", "layer3.0.conv2"}
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert count_params(loaded) == 262890
    assert load_meta(path) == {"test_acc": 0.5, "cfg": {"lr": 0.1}}
    assert torch.load(path, weights_only=True)["format"] == FORMAT


def test_model_without_config_is_pickled(tmp_path):
    model = UserNet().eval()
    wrap_model(model)
    prune_conv(model, "body", "out", 3)
    path = save_model(model, tmp_path / "user.pt", meta={"note": "mine"})
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(load_model(path)(x), model(x))
    assert load_meta(path) == {"note": "mine"}


def test_missing_file_says_how_to_get_one(tmp_path):
    with pytest.raises(CheckpointNotFound,
                       match=r"no model file at .*nothing.pt; train one with `python -m hbgs.run "
                             r"stage=train model="):
        load_model(tmp_path / "nothing.pt")


def test_files_of_other_formats_are_rejected(tmp_path):
    torch.save({"state_dict": resnet20().state_dict()}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="expected format 'hbgs-model/2', found None"):
        load_model(tmp_path / "weights.pt")
    torch.save(resnet20(), tmp_path / "module.pt")  # a pickled module is not our format either
    with pytest.raises(CheckpointError, match="module.pt is not an hbgs model file"):
        load_meta(tmp_path / "module.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt is not an hbgs model file"):
        load_model(tmp_path / "notes.txt")


def test_mismatched_weights_name_the_keys_and_shapes(tmp_path):
    path = save_model(pruned_resnet20(), tmp_path / "model.pt", model_cfg=RESNET20)
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["fc.bias"]
    payload["state_dict"]["fc.weight"] = torch.zeros(5, 64)
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(payload, path)
    with pytest.raises(CheckpointError,
                       match=r"missing keys \(1\): fc.bias; unexpected keys \(1\): extra.weight; "
                             r"shape mismatches \(1\): fc.weight: file \(5, 64\), model \(10, 64\)"):
        load_model(path)


def test_config_of_another_architecture_is_reported(tmp_path):
    path = save_model(pruned_resnet20(), tmp_path / "model.pt",
                      model_cfg={"_target_": "hbgs.models.resnet32", "num_classes": 10})
    # ResNet-32 has 2 more blocks per stage: 6 blocks × (2 conv weights + 2 BN × 5 entries) = 72
    with pytest.raises(CheckpointError, match=r"missing keys \(72\): layer1.3.bn1.bias"):
        load_model(path)
    payload = torch.load(path, weights_only=True)
    payload["structure"]["layer9.conv"] = payload["structure"]["layer1.0.conv1"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="pruned layer 'layer9.conv' but the model built"):
        load_model(path)


def test_failed_save_leaves_the_previous_file(tmp_path):
    path = save_model(resnet20(), tmp_path / "model.pt", model_cfg=RESNET20, meta={"v": 1})
    with pytest.raises(TypeError, match=r"meta\['bad'\] has type object; save only plain data"):
        save_model(resnet20(), path, model_cfg=RESNET20, meta={"bad": object()})
    assert load_meta(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]

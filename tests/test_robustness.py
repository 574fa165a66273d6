"""The robustness sweep (stage=robustness): plain removal against compensated removal of the
same fraction of filters in every layer, no fine-tuning."""

import copy
import json

import pytest
import torch

from hbgs.errors import HbgsError
from hbgs.models import resnet20
from hbgs.pruning import AdaptedConv, propose, uncompensated, wrap_model
from hbgs.robustness import filters_pruned, parse_method, robustness_curves
from conftest import hbgs_run
from test_prune_stage import assert_valid_png


def test_uncompensated_keeps_unit_rows_and_reports_the_removed_norm():
    torch.manual_seed(0)
    layer = AdaptedConv.wrap(torch.nn.Conv2d(6, 10, 3))
    compensated = propose(layer, "out", 4, "l2")
    plain = uncompensated(layer, "out", compensated)
    F = layer.conv.weight.detach().flatten(1).double()
    assert torch.equal(plain.keep, compensated.keep) and plain.method == "l2-removal"
    assert torch.equal(plain.coef[plain.removed], torch.zeros(4, 6, dtype=plain.coef.dtype))
    assert torch.equal(plain.coef[plain.keep], torch.eye(6, dtype=plain.coef.dtype))
    assert plain.error == pytest.approx(F[plain.removed].pow(2).sum().item(), rel=1e-12)
    assert compensated.error < plain.error  # least squares never does worse than dropping


def test_plain_removal_equals_zeroing_the_smallest_filters_and_compensation_differs():
    torch.manual_seed(1)
    model = resnet20().eval()
    x = torch.randn(4, 3, 32, 32)
    masked = copy.deepcopy(model)
    wrapped = wrap_model(copy.deepcopy(model))  # the names of the prunable convs
    for name in wrapped:
        weight = masked.get_submodule(name).weight.data
        norms = weight.flatten(1).norm(dim=1)
        weight[torch.sort(norms, stable=True).indices[: int(0.25 * len(norms) + 0.5)]] = 0
    pruned = filters_pruned(model, 0.25, "l2-removal")
    torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-5)
    compensated = filters_pruned(model, 0.25, "l2")  # same filters, least-squares compensation
    assert not torch.allclose(compensated(x), masked(x), atol=1e-3)
    widths = {n: m.conv.out_channels for n, m in pruned.named_modules() if isinstance(m, AdaptedConv)}
    assert sorted(set(widths.values())) == [12, 24, 48]  # 16, 32, 64 less a quarter


def test_curves_have_one_row_per_point_and_fraction_zero_is_dense():
    torch.manual_seed(2)
    models = {"a": resnet20().eval(), "b": resnet20().eval()}
    x = torch.randn(8, 3, 32, 32)
    reference = {label: m(x).argmax(1) for label, m in models.items()}
    calls = []

    def agreement(model):  # share of inputs whose prediction matches the dense model's
        calls.append(model)
        predictions = model(x).argmax(1)
        return max((predictions == r).float().mean().item() for r in reference.values())

    rows = robustness_curves(models, [0.0, 0.5], ["l2-removal", "backward"], agreement)
    assert [(r["checkpoint"], r["method"], r["fraction"]) for r in rows] == [
        (c, m, f) for c in "ab" for m in ("l2-removal", "backward") for f in (0.0, 0.5)]
    assert len(calls) == 2 + 4  # the dense model once per checkpoint, then each pruned point
    dense = [r for r in rows if r["fraction"] == 0]
    assert all(r["test_acc"] == 1.0 and r["params_reduction"] == 0 for r in dense)
    half = [r for r in rows if r["fraction"] == 0.5]
    assert all(r["params_reduction"] > 30 for r in half)


@pytest.mark.parametrize("name", ["backward-removal", "l3", "omp-removal"])
def test_unknown_methods_are_refused_with_the_valid_ones(name):
    with pytest.raises(HbgsError, match="l2-removal"):
        parse_method(name)
    assert parse_method("l2-removal") == ("l2", False) and parse_method("omp") == ("omp", True)


def test_stage_overlays_checkpoints_in_one_csv_and_png(trained_run, tmp_path):
    out = hbgs_run("stage=robustness", f"robustness.checkpoints={{zoo: zoo/resnet20-cifar10.pt, "
                   f"tiny: {trained_run / 'model.pt'}}}", "robustness.fractions=[0,0.5]",
                   "dataset.limit_test=200", "logger=csv", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (tmp_path / "robustness.csv").read_text().splitlines()
    assert lines[0] == "checkpoint,method,fraction,test_acc,params_reduction,flops_reduction"
    assert len(lines) == 1 + 2 * 2 * 2
    assert_valid_png(tmp_path / "robustness.png")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_images"] == 200 and set(summary["checkpoints"]) == {"zoo", "tiny"}
    assert summary["test_acc"]["zoo/l2-removal/0"] > 0.8  # the shipped model, dense
    assert summary["test_acc"]["zoo/l2-removal/0"] == summary["test_acc"]["zoo/backward/0"]
    assert (tmp_path / "metrics.csv").is_file()

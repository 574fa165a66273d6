"""Torch-Pruning as a peer method (hbgs.pruning.peers; criteria tp_l1 and tp_group_norm): the same
targets, the same accounting and the same outputs as the project's own methods."""

import importlib.util
import json
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

import hbgs
from hbgs.accounting import count_macs, count_params
from hbgs.checkpoint import load_meta
from hbgs.collect import table_row
from hbgs.errors import HbgsError
from hbgs.models import resnet18
from hbgs.pruning.peers import ignored_layers, prune_at_ratio, torch_pruning_allocation
from conftest import CONF_DIR, QUICK, hbgs_run

needs_tp = pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None,
                              reason="torch_pruning is not installed: pip install torch-pruning")


@pytest.fixture(scope="module")
def zoo_resnet20():
    torch.set_num_threads(1)
    return hbgs.load_model("zoo/resnet20-cifar10.pt").eval()


@needs_tp
def test_left_out_layers_are_found_not_named(zoo_resnet20):
    x = torch.randn(1, 3, 32, 32)
    # Option-A shortcuts: the residual streams (stem, each block's second conv) and the classifier.
    expected = ["conv1", "fc"] + [f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)]
    assert sorted(ignored_layers(zoo_resnet20, x)) == sorted(expected)
    # Option-B (1×1 projection) shortcuts: Torch-Pruning resizes the streams; only the classifier stays.
    assert ignored_layers(resnet18().eval(), x) == ["fc"]


@needs_tp
@pytest.mark.parametrize("importance", ["l1", "group_norm"])
@pytest.mark.parametrize("metric,target", [("params", 40.0), ("flops", 30.0)])
def test_peers_reach_the_target(zoo_resnet20, importance, metric, target):
    before = {k: v.clone() for k, v in zoo_resnet20.state_dict().items()}
    allocation = torch_pruning_allocation(zoo_resnet20, zoo_resnet20, importance=importance,
                                          **{f"target_{metric}": target}, tolerance=0.5)
    pruned, cost = allocation.model, allocation.cost
    assert all(torch.equal(v, zoo_resnet20.state_dict()[k]) for k, v in before.items())  # input untouched
    # The target is met, the reported cost is the pruned model's, and the model runs.
    assert allocation.reduction == cost.reduction(metric) >= target > allocation.below
    assert (cost.params, cost.flops) == (count_params(pruned), count_macs(pruned))
    assert 100 * (1 - cost.params / count_params(zoo_resnet20)) == pytest.approx(cost.params_reduction)
    with torch.no_grad():
        out = pruned.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # Within tolerance, or the smallest ratio: a little less falls short (a gap no ratio fills).
    if allocation.within_tolerance:
        assert allocation.reduction - target <= 0.5
    else:
        smaller = prune_at_ratio(zoo_resnet20, allocation.ratio - 1e-4, importance=importance,
                                 ignored=allocation.ignored)
        reduction = 100 * (1 - (count_params(smaller) if metric == "params" else count_macs(smaller))
                           / (count_params(zoo_resnet20) if metric == "params" else count_macs(zoo_resnet20)))
        assert reduction < target
    # Left-out layers keep their outputs; l1 prunes every block by the one ratio, group_norm ranks globally.
    originals = dict(zoo_resnet20.named_modules())
    for name in allocation.ignored:
        assert pruned.get_submodule(name).weight.shape[0] == originals[name].weight.shape[0]
    kept = {n: m.out_channels for n, m in pruned.named_modules()
            if isinstance(m, torch.nn.Conv2d) and n not in allocation.ignored}
    assert len(kept) == 9 and all(".conv1" in n for n in kept)
    if importance == "l1":
        assert all(c == int(originals[n].out_channels * (1 - allocation.ratio)) for n, c in kept.items())
    else:
        assert len(set(allocation.ratios.values())) > 1  # the blocks lose different fractions
    assert allocation.global_pruning is (importance == "group_norm")


@needs_tp
def test_unreachable_target_and_bad_importance_get_one_message(zoo_resnet20):
    with pytest.raises(HbgsError, match="out of reach"):
        torch_pruning_allocation(zoo_resnet20, zoo_resnet20, target_params=99)
    with pytest.raises(HbgsError, match="importance='l2'"):
        torch_pruning_allocation(zoo_resnet20, zoo_resnet20, importance="l2", target_params=50)


def test_missing_torch_pruning_stops_before_loading(monkeypatch, tmp_path):
    from hbgs.prune_stage import prune

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # `import torch_pruning` raises ImportError
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["method=tp_group_norm", "ckpt=/no/such/model.pt"])
    with pytest.raises(HbgsError, match="pip install torch-pruning") as error:
        prune(cfg, tmp_path)  # the checkpoint (missing) is never read
    assert "criterion=tp_group_norm" in str(error.value)


def summary_keys(summary, skip=("details", "widths", "export", "latency_cpu", "config")):
    """Every key path of a summary, but those whose contents depend on the method (the resolved
    config holds each criterion's own options)."""
    def walk(data, prefix):
        for key, value in data.items():
            yield prefix + key
            if isinstance(value, dict) and key not in skip:
                yield from walk(value, prefix + key + ".")
    return set(walk(summary, ""))


@needs_tp
def test_cli_run_writes_what_a_uniform_run_writes(tmp_path):
    out = hbgs_run("-m", "method=tp_l1,l1", "criterion.target.params=null", "criterion.target.flops=30",
                   "finetune.final_epochs=0", "threads=1", "latency.repeats=2", "latency.batch_sizes=[1,8]",
                   f"hydra.sweep.dir={tmp_path}", *QUICK)
    assert out.returncode == 0, out.stderr[-3000:]
    tp_dir, = tmp_path.glob("*_tp_l1_*")
    uniform_dir, = tmp_path.glob("*_uniform_l1")
    files = {p.name for p in uniform_dir.iterdir() if p.is_file()}
    assert {"summary.json", "history.csv", "model.pt", "model_exported.pt", "accuracy_vs_flops.png",
            "widths.png"} <= files
    assert {p.name for p in tp_dir.iterdir() if p.is_file()} == files
    tp, uniform = (json.loads((d / "summary.json").read_text()) for d in (tp_dir, uniform_dir))
    assert summary_keys(tp) == summary_keys(uniform)
    assert (tp["method"], tp["criterion"], tp["selector"], tp["surgery"]) == ("tp_l1", "tp_l1", "tp-l1", "remove")
    assert tp["cost"]["reduction_vs_original_pct"]["flops"] >= 30
    assert tp["details"]["ignored_layers"][-1] == "fc" and tp["details"]["importance"] == "l1"
    # The saved model: pickle-free (model_cfg + the changed plain modules), costs as summarised.
    payload = torch.load(tp_dir / "model.pt", weights_only=True)
    assert payload["model_cfg"]["_target_"] == "hbgs.models.resnet20" and "module" not in payload
    assert payload["structure"]["layer3.0.conv1"]["kind"] == "Conv2d"
    model = hbgs.load_model(tp_dir / "model.pt")
    assert (count_params(model), count_macs(model)) == (tp["cost"]["pruned"]["params"], tp["cost"]["pruned"]["flops"])
    assert set(tp["widths"]) == {f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2)}
    exported = hbgs.load_model(tp_dir / "model_exported.pt")
    assert load_meta(tp_dir / "model_exported.pt")["exported"] is True
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(exported(x), model(x), atol=1e-4 * model(x).abs().max().item())
    history = (tp_dir / "history.csv").read_text().splitlines()
    assert len(history) == 2 and history[1].split(",")[3] == str(tp["cost"]["pruned"]["params"])
    # The table names the method, from the sweep's own table and from the summary alone.
    table = (tmp_path / "table.md").read_text()
    assert "| tp_l1 | tp_l1 + tp-l1 | remove | resnet20 | -30% FLOPs |" in table
    assert "| l1 | uniform + l1 | adapters |" in table
    assert table_row(tp, {}, tp_dir)["method"] == "tp_l1"
    assert table_row(tp | {"criterion": "tp_group_norm", "selector": "tp-group-norm"}, {}, tp_dir)["method"] \
        == "tp_group_norm"

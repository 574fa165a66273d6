"""The zoo trainer: augmentation on the device equals the per-image one, the recorded accuracy is the
saved file's, float16 storage, a budget that is kept, and resume equals an uninterrupted run."""

import math

import pytest
import torch
import torch.nn.functional as F

from hbgs import zoo_train
from hbgs.checkpoint import load_meta, load_model, save_model
from hbgs.data import AugmentedImages, DeviceBatches, ImageDataModule, ImageSplit
from hbgs.models import resnet20
from hbgs.module import evaluate_accuracy

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def random_split(n=10, size=8, seed=0) -> ImageSplit:
    g = torch.Generator().manual_seed(seed)
    return ImageSplit(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n))


def test_device_crop_and_flip_equals_cropping_each_image_by_hand():
    split = random_split()
    batches = DeviceBatches(split, MEAN, STD, batch_size=10, augment=True, seed=3)
    cropped = batches.crop_and_flip(split.images)
    draws = torch.Generator().manual_seed(3)  # the same draws, in the same order
    top, left = torch.randint(0, 9, (2, 10), generator=draws)
    flip = torch.rand(10, generator=draws) < 0.5
    assert 0 < flip.sum() < 10 and len(set(top.tolist())) > 1  # the draw exercises both branches
    for i in range(10):
        expected = F.pad(split.images[i], (4,) * 4)[:, top[i]:top[i] + 8, left[i]:left[i] + 8]
        expected = expected.flip(-1) if flip[i] else expected
        assert torch.equal(cropped[i], expected)


def test_cutout_erases_one_square_per_image_clipped_at_the_border():
    batches = DeviceBatches(random_split(), MEAN, STD, batch_size=10, augment=True, seed=4, cutout=4)
    mask = batches.cutout_mask(10, 8, 8)
    draws = torch.Generator().manual_seed(4)  # the same draws, in the same order
    centre_row, centre_col = torch.randint(0, 8, (10,), generator=draws), torch.randint(0, 8, (10,), generator=draws)
    for i in range(10):
        expected = torch.zeros(8, 8, dtype=torch.bool)
        expected[max(0, centre_row[i] - 2):centre_row[i] + 2, max(0, centre_col[i] - 2):centre_col[i] + 2] = True
        assert torch.equal(mask[i, 0], expected)
    areas = mask.sum((1, 2, 3)).tolist()
    assert 16 in areas and min(areas) < 16  # whole squares and squares cut by the border both occur


def test_cutout_sets_the_erased_pixels_to_the_mean_and_leaves_the_rest():
    split = random_split()
    plain = DeviceBatches(split, MEAN, STD, batch_size=10, augment=True, seed=5)
    cut = DeviceBatches(split, MEAN, STD, batch_size=10, augment=True, seed=5, cutout=4)
    (x_cut, y_cut), (x_plain, y_plain) = next(iter(cut)), next(iter(plain))
    plain.cutout = 4
    mask = plain.cutout_mask(10, 8, 8)  # the draws `cut` made after the same order, crops and flips
    assert torch.equal(y_cut, y_plain) and mask.any()
    assert torch.equal(x_cut, x_plain.masked_fill(mask, 0.0))  # 0 after normalising: the mean


def test_unaugmented_device_batches_equal_the_dataset_in_order():
    split = random_split(n=10)
    batches = DeviceBatches(split, MEAN, STD, batch_size=4, augment=False)
    dataset = AugmentedImages(split, MEAN, STD, augment=False)
    xs, ys = zip(*batches)
    assert [len(y) for y in ys] == [4, 4, 2] and len(batches) == 3
    assert torch.allclose(torch.cat(xs), torch.stack([dataset[i][0] for i in range(10)]), atol=1e-6)
    assert torch.equal(torch.cat(ys), split.labels)


def test_an_augmented_epoch_visits_every_image_once():
    split = random_split(n=10)
    labels = torch.cat([y for _, y in DeviceBatches(split, MEAN, STD, batch_size=3, augment=True, seed=1)])
    assert sorted(labels.tolist()) == list(range(10)) and not torch.equal(labels, split.labels)


def test_half_precision_file_loads_the_rounded_network(tmp_path):
    model = resnet20().eval()
    path = save_model(model, tmp_path / "m.pt", model_cfg={"_target_": "hbgs.models.resnet20", "num_classes": 10},
                      half=True)
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert stored["conv1.weight"].dtype == torch.float16 and stored["bn1.num_batches_tracked"].dtype == torch.int64
    loaded = load_model(path)
    assert loaded.conv1.weight.dtype == torch.float32
    assert torch.equal(loaded.conv1.weight, model.conv1.weight.half().float())


def test_plan_fits_the_time_left_and_never_stretches_late():
    # 10 s per epoch, 100 s left: 9 more fit after the safety margin
    assert zoo_train.plan_epochs(done=2, planned=200, max_epochs=200, recent_epoch_seconds=[10],
                                 seconds_left=100) == 11
    assert zoo_train.plan_epochs(2, 200, 5, [10], 1000) == 5  # capped by the recipe
    assert zoo_train.plan_epochs(2, 200, 200, [10], 5) == 2  # not one more fits: stop
    assert zoo_train.plan_epochs(6, 10, 200, [1], 1000) == 10  # past half the plan: no longer
    assert zoo_train.plan_epochs(6, 10, 200, [10], 20) == 7  # but shorter when time runs out
    assert zoo_train.plan_epochs(0, 200, 30, [10], math.inf) == 30


def test_one_slow_epoch_late_in_the_plan_does_not_shorten_it():
    # 70 of 120 epochs done at 80 s each, 50 left fit in 80 min; one paused epoch of 500 s alone would
    # cut the plan to 70 + 8 = 78 for good; the median of the last three keeps it at 120
    seconds_left = 80 * 60
    assert zoo_train.plan_epochs(70, 120, 200, [500], seconds_left) == 78
    assert zoo_train.plan_epochs(70, 120, 200, [80, 81, 500], seconds_left) == 120
    # a lasting slow-down (two slow epochs of the last three) does shorten it
    assert zoo_train.plan_epochs(70, 120, 200, [80, 500, 500], seconds_left) == 78


def tiny_args(tmp_path, cifar10_root, **extra):
    argv = ["--models", "resnet20", "--device", "cpu", "--no-bf16", "--limit-train", "256", "--limit-test", "200",
            "--max-epochs", "3", "--eval-every", "1", "--out", str(tmp_path), "--data-root", cifar10_root]
    args = zoo_train.parse_args(argv + [x for k, v in extra.items() for x in (f"--{k}", str(v))])
    args.deadline = math.inf
    return args


def test_trained_file_records_the_accuracy_it_scores(tmp_path, cifar10_root, one_thread):
    record = zoo_train.train_one("resnet20", tiny_args(tmp_path, cifar10_root, cutout=8))
    path = tmp_path / "resnet20-cifar10.pt"
    meta = load_meta(path)
    assert "flip, cutout 8 on the device" in meta["schedule"] and record["recipe"]["cutout"] == 8
    assert meta["epochs"] == 3 and [r["epoch"] for r in record["history"]] == [1, 2, 3]
    assert record["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule finished
    dm = ImageDataModule(root=cifar10_root, calib_size=1000, limit_train=256, limit_test=200, seed=0)
    assert evaluate_accuracy(load_model(path), dm.test_dataloader()) == meta["test_acc"]
    assert not (tmp_path / ".resnet20-cifar10.state.pt").exists()  # a finished run leaves no state behind


class Stop(Exception):
    pass


@pytest.mark.parametrize("swa", [False, True])
def test_resumed_training_ends_with_the_uninterrupted_weights(tmp_path, cifar10_root, one_thread, monkeypatch,
                                                             capsys, swa):
    if swa:  # the running average travels in the state too
        save_model(resnet20(num_classes=10), tmp_path / "start.pt",
                   model_cfg={"_target_": "hbgs.models.resnet20", "num_classes": 10})

    def tiny_args_(out, **extra):
        args = tiny_args(out, cifar10_root, **({"init": tmp_path / "start.pt"} if swa else {}), **extra)
        args.swa = swa
        return args

    zoo_train.train_one("resnet20", tiny_args_(tmp_path / "whole"))
    whole = load_model(tmp_path / "whole" / "resnet20-cifar10.pt").state_dict()

    save_state = zoo_train.save_state

    def save_then_stop(path, **state):
        save_state(path, **state)
        if state["epoch"] == 1:
            raise Stop

    monkeypatch.setattr(zoo_train, "save_state", save_then_stop)
    with pytest.raises(Stop):
        zoo_train.train_one("resnet20", tiny_args_(tmp_path / "cut"))
    monkeypatch.setattr(zoo_train, "save_state", save_state)
    changed = tiny_args_(tmp_path / "cut", cutout=8)
    changed.resume = True
    with pytest.raises(SystemExit, match="resume with the first call's flags"):  # not a mix of two recipes
        zoo_train.train_one("resnet20", changed)
    args = tiny_args_(tmp_path / "cut")
    args.resume = True
    capsys.readouterr()
    record = zoo_train.train_one("resnet20", args)
    printed = capsys.readouterr().out
    assert "resumed after epoch 1 of 3" in printed and "epoch 1 planned" not in printed  # it did not start over
    resumed = load_model(tmp_path / "cut" / "resnet20-cifar10.pt").state_dict()
    assert [r["epoch"] for r in record["history"]] == [1, 2, 3]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_warm_start_begins_from_the_given_weights_and_records_them(tmp_path, cifar10_root, one_thread):
    start = resnet20(num_classes=10)
    save_model(start, tmp_path / "start.pt", half=True, model_cfg={"_target_": "hbgs.models.resnet20", "num_classes": 10},
               meta={"epochs": 81, "test_acc": 0.8871})
    # A learning rate too small to move a float16-stored weight: what comes out is what went in.
    record = zoo_train.train_one("resnet20", tiny_args(tmp_path / "out", cifar10_root, init=tmp_path / "start.pt",
                                                       lr=1e-12, **{"max-epochs": 1}))
    begun, ended = load_model(tmp_path / "start.pt").state_dict(), load_model(tmp_path / "out" / "resnet20-cifar10.pt")
    weights = [k for k, v in begun.items() if k.endswith("weight") and v.dim() > 1]
    assert len(weights) == 20 and all(torch.equal(begun[k], ended.state_dict()[k]) for k in weights)
    assert record["init"] == {"path": str(tmp_path / "start.pt"), "epochs": 81, "test_acc": 0.8871}
    assert zoo_train.epochs_in_all(load_meta(tmp_path / "out" / "resnet20-cifar10.pt")) == 81 + 1


def test_swa_saves_the_mean_of_the_epochs_after_the_warm_up(tmp_path, cifar10_root, one_thread, monkeypatch):
    start = resnet20(num_classes=10)
    save_model(start, tmp_path / "start.pt", model_cfg={"_target_": "hbgs.models.resnet20", "num_classes": 10},
               meta={"epochs": 5, "test_acc": 0.1})
    epoch_weights, save_state = {}, zoo_train.save_state

    def save_and_keep(path, **state):
        epoch_weights[state["epoch"]] = {k: v.clone() for k, v in state["model"].items()}
        save_state(path, **state)

    monkeypatch.setattr(zoo_train, "save_state", save_and_keep)
    args = tiny_args(tmp_path / "out", cifar10_root, init=tmp_path / "start.pt", lr=0.05, **{"max-epochs": 5})
    args.swa = True
    record = zoo_train.train_one("resnet20", args)
    # each row's rate is the next step's: held at the peak from the end of the 2 warm-up epochs on
    assert [r["lr"] for r in record["history"]][1:] == pytest.approx([0.05] * 4)
    assert [r.get("averaged") for r in record["history"]] == [None, None, 1, 2, 3]
    saved = load_model(tmp_path / "out" / "resnet20-cifar10.pt")
    mean = {k: sum(epoch_weights[e][k] for e in (3, 4, 5)) / 3 for k in epoch_weights[5]}
    for name, weight in saved.named_parameters():
        assert torch.allclose(weight, mean[name].half().float(), atol=1e-3, rtol=1e-3), name
        if weight.dim() > 1:  # the kernels moved further than float16 rounding: the average is not the last epoch's
            assert not torch.allclose(weight, epoch_weights[5][name], atol=1e-3, rtol=1e-3), name
    # BatchNorm statistics recomputed for the averaged weights: the mean over the training batches of the
    # first BatchNorm's input, which the last iterate's running average does not equal.
    averaged = resnet20(num_classes=10)
    averaged.load_state_dict({**saved.state_dict(), **{k: v for k, v in mean.items() if "running" not in k}})
    dm = ImageDataModule(root=cifar10_root, calib_size=1000, limit_train=256, limit_test=200, seed=0)
    dm.setup()
    batches = DeviceBatches(dm.splits["train"], dm.mean, dm.std, 128, augment=True, device=torch.device("cpu"),
                            seed=0, drop_last=True)
    with torch.no_grad():
        first = torch.cat([averaged.conv1(x) for x, _ in batches])
    # (measured: 0.003 apart, the crops and flips being other draws; the last iterate's 0.12)
    assert torch.allclose(saved.bn1.running_mean, first.mean((0, 2, 3)), atol=0.02)
    assert not torch.allclose(epoch_weights[5]["bn1.running_mean"], first.mean((0, 2, 3)), atol=0.05)
    meta = load_meta(tmp_path / "out" / "resnet20-cifar10.pt")
    assert meta["averaged_epochs"] == 3 and "weights of 3 epochs averaged and BatchNorm" in meta["schedule"]
    assert evaluate_accuracy(saved, dm.test_dataloader()) == meta["test_acc"]
    assert 0 <= meta["test_acc_last_iterate"] <= 1


def test_swa_from_an_average_goes_on_with_it(tmp_path, cifar10_root, one_thread, monkeypatch):
    start = resnet20(num_classes=10)
    save_model(start, tmp_path / "start.pt", model_cfg={"_target_": "hbgs.models.resnet20", "num_classes": 10},
               meta={"epochs": 5, "test_acc": 0.1, "averaged_epochs": 3})  # as a --swa run records it
    epoch_weights, save_state = {}, zoo_train.save_state

    def save_and_keep(path, **state):
        epoch_weights[state["epoch"]] = {k: v.clone() for k, v in state["model"].items()}
        save_state(path, **state)

    monkeypatch.setattr(zoo_train, "save_state", save_and_keep)
    args = tiny_args(tmp_path / "out", cifar10_root, init=tmp_path / "start.pt", lr=0.05)
    args.swa = True
    record = zoo_train.train_one("resnet20", args)
    assert [r.get("averaged") for r in record["history"]] == [None, None, 4]  # 3 before, epoch 3 of this run
    begun, saved = start.state_dict(), load_model(tmp_path / "out" / "resnet20-cifar10.pt")
    for name, weight in saved.named_parameters():  # the old average weighs 3, the new epoch 1
        assert torch.allclose(weight, ((3 * begun[name] + epoch_weights[3][name]) / 4).half().float(),
                              atol=1e-3, rtol=1e-3), name
    meta = load_meta(tmp_path / "out" / "resnet20-cifar10.pt")
    assert meta["averaged_epochs"] == 4 and "weights of 1 epochs averaged with the 3-epoch average" in meta["schedule"]


def test_bad_flags_fail_before_any_work(capsys, tmp_path):
    save_model(resnet20(num_classes=100), tmp_path / "cifar100.pt",
               model_cfg={"_target_": "hbgs.models.resnet20", "num_classes": 100})
    for argv, message in [(["--minutes", "0"], "--minutes=0.0 must be positive"),
                          (["--models", "alexnet"], "invalid choice: 'alexnet'"),
                          (["--cutout", "-1"], "--cutout=-1 must be 0 (off)"),
                          (["--swa"], "--swa averages the epochs of a trained network: pass --init"),
                          (["--device", "cuda"] if not torch.cuda.is_available() else ["--eval-every", "-1"],
                           "no CUDA GPU" if not torch.cuda.is_available() else "--eval-every=-1"),
                          (["--models", "resnet20", "--init", "no/such.pt"], "--init no/such.pt: no no/such.pt"),
                          (["--models", "resnet20", "--init", "zoo/resnet56-cifar10.pt"],
                           "holds hbgs.models.resnet56, not hbgs.models.resnet20"),
                          (["--models", "resnet20", "--init", str(tmp_path / "cifar100.pt")],
                           "is a pruned or resized resnet20")]:
        with pytest.raises(SystemExit) as stop:
            zoo_train.parse_args(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err

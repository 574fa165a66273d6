"""The accuracy of the running average a `hbgs.zoo_train --swa` run has reached so far, read from
the state file its last finished epoch left (BatchNorm statistics recomputed over the augmented
training images, as the run does at its end; bf16 autocast where the run uses it):

    python experiments/zoo_training/peek_swa.py vgg16 outputs/zoo_vgg_swa/.vgg16-cifar10.state.pt

Copy the state file first if the run is still going (it is rewritten after every epoch). One thread:
a forward pass over the training split and one over the test split (about 10 minutes for a VGG-16
on a busy 2-core CPU, 1 for a ResNet-20)."""

import argparse
import types

import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from hbgs import models, zoo_train
from hbgs.data import DeviceBatches
from hbgs.devices import bf16_is_fast

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("model", choices=sorted(zoo_train.RECIPES))
p.add_argument("state", help="<out>/.<model>-cifar10.state.pt of a --swa run")
args = p.parse_args()
torch.set_num_threads(1)
state = torch.load(args.state, map_location="cpu", weights_only=False)
if not state.get("averaged"):
    p.error(f"{args.state} is not the state of a --swa run (it holds no running average)")
dm = zoo_train.datamodule(types.SimpleNamespace(data_root=None, seed=0, limit_train=None, limit_test=None,
                                                cache_dir="~/.cache/hbgs"))
averaged = AveragedModel(getattr(models, args.model)(num_classes=dm.num_classes))
try:
    averaged.load_state_dict(state["averaged"])
except RuntimeError:
    p.error(f"{args.state} does not hold a {args.model}: name the model its run trained")
cpu = torch.device("cpu")
update_bn(DeviceBatches(dm.splits["train"], dm.mean, dm.std, state["recipe"]["batch_size"], augment=True,
                        device=cpu, seed=1, drop_last=True, cutout=state["recipe"]["cutout"]), averaged.module)
test = DeviceBatches(dm.splits["test"], dm.mean, dm.std, 1000, augment=False, device=cpu)
print(f"{args.model}: after epoch {state['epoch']}, the average of {int(averaged.n_averaged)} epochs scores "
      f"{100 * zoo_train.accuracy(averaged.module, test, bf16_is_fast('cpu')):.2f} % on {len(dm.splits['test'])} "
      "test images")

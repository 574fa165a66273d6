"""The names of the prune criteria (``criterion=``, conf/criterion), in one place that imports
nothing: ``hbgs.validation`` checks a config against them before Lightning loads."""

# The upper level round by round (hierarchical.hierarchical_prune, docs/algorithms.md §2).
LOOP_CRITERIA = ("hbgs", "hbgts")
# Torch-Pruning's own pruner (peers.torch_pruning_allocation): criterion name → importance.
PEER_CRITERIA = {"tp_l1": "l1", "tp_group_norm": "group_norm"}
# Every criterion stage=prune runs: the loop, the ACRA allocations (acra.py), one fraction of
# every layer (ratios.prune_uniform_fraction), and the peers.
CRITERIA = (*LOOP_CRITERIA, "uniform", "sensitivity", "uniform_fraction", *PEER_CRITERIA)

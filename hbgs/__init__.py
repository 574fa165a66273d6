"""hbgs: greedy hierarchical whole-network filter pruning of CNNs (Purohit et al., TMLR 2024)."""

__version__ = "0.1.0"

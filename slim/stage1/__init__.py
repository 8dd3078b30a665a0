"""Stage 1: risk-aware probes on every head, the layer detector, the edited layer.

Modules, in order:
    losses    FPR+FNR risk (the paper's), cross-entropy and l2 probe losses
    probes    RiskAwareProbes: every head of every layer trained at once; save / load
    detector  the layer detector's tau, per-layer FNR / FPR, choose_layer
    fit       stage 1 per fold, chosen_layers, layer_table

The names of the old `slim.stage1` module are re-exported here.
"""

from .fit import (
    FoldProbes,
    chosen_layers,
    fit_stage1,
    layer_table,
    train_fold_probes,
)

__all__ = [
    "FoldProbes",
    "train_fold_probes",
    "fit_stage1",
    "layer_table",
    "chosen_layers",
]

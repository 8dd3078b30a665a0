"""Intervention policies and their fitting.

A policy is what an edit is (tensors and knobs, attach / save / load); every kind registers into
`POLICY_KINDS` when its module is imported, and importing this package imports them all, so
`Policy.load` reads any saved policy.

Modules:
    base         Policy, DetectorPolicy, model_fingerprint, the kind registry
    slim         SlimPolicy: the layer detector gates a move toward each voting head's OT image
    iti          ITIPolicy: a fixed shift along each chosen head's truthful direction
    mimic        MimicPolicy: every head mapped by its Gaussian OT map, no detector
    gaussian_ot  the exact head-wise chance-constrained problem and the Gaussian OT map (math)
    head_maps    one head's and one layer's maps fitted from activations; save / load
    linear_act   Linear-AcT: per-dimension affine OT maps
    mixed        Table 2's arms: SLIM's intervention on ITI's heads, ITI's on SLIM's layer
    fit          fitting SLIM, ITI and MiMiC for a fold
"""

from .base import (
    POLICY_FORMAT,
    POLICY_KINDS,
    DetectorPolicy,
    Policy,
    model_fingerprint,
)
from .fit import (
    fit_iti,
    fit_mimic,
    fit_slim,
    fold_layer_activations,
    iti_for_fold,
    iti_tuning_activations,
    slim_for_fold,
)
from .iti import (
    ITIPolicy,
)
from .linear_act import (
    PAIRING,
    LinearActPolicy,
    affine_fit,
    check_strength,
    fit_linear_act,
    linear_act_for_fold,
    sorted_pairs,
)
from .mimic import (
    MimicPolicy,
)
from .mixed import (
    ITIOnSlimLayerPolicy,
    SlimOnITIHeadsPolicy,
    iti_layer_shifts,
    iti_on_slim_layer_for_fold,
    slim_on_heads,
    slim_on_iti_heads_for_fold,
)
from .slim import (
    SlimPolicy,
)

__all__ = [
    "POLICY_KINDS",
    "POLICY_FORMAT",
    "model_fingerprint",
    "Policy",
    "DetectorPolicy",
    "SlimPolicy",
    "ITIPolicy",
    "MimicPolicy",
    "PAIRING",
    "check_strength",
    "sorted_pairs",
    "affine_fit",
    "fit_linear_act",
    "linear_act_for_fold",
    "LinearActPolicy",
    "SlimOnITIHeadsPolicy",
    "ITIOnSlimLayerPolicy",
    "slim_on_heads",
    "slim_on_iti_heads_for_fold",
    "iti_layer_shifts",
    "iti_on_slim_layer_for_fold",
    "fit_slim",
    "fold_layer_activations",
    "slim_for_fold",
    "fit_iti",
    "iti_tuning_activations",
    "iti_for_fold",
    "fit_mimic",
]

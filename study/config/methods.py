"""Stage-2 methods by name.

Each method is a *kind* of procedure plus a preset of :class:`~study.config.schema.Stage2Config` values
that define it (its loss, whether MaxNorm is on, its sampler). A search-space file picks methods
under ``stage2.methods`` and may search or fix any Stage2Config field per method; values precedence
is: dataclass defaults < protocol preset < ``stage2`` common values < method preset < the method's
own values in the file.

Kinds:
- ``identity``: the stage-1 classifier as it is (the table's "no stage 2" row);
- ``trained``: a classifier (or LWS scales) trained on the frozen backbone, best epoch on the
  selection split;
- ``posthoc``: no training — a transformation of the stage-1 classifier whose tau is picked on the
  selection split from a grid (or fixed);
- ``ncm``: nearest class mean on centred, L2-normalised features.
"""

from __future__ import annotations

from study.config.registry import METHODS as _REGISTRY_METHODS
from study.config.registry import Method, MethodInputs  # noqa: F401  (defined with the registry)


def _register_builtins() -> None:
    # the built-ins go through the public door a plug-in uses (study.register_method)
    from study.config.registry import register_method

    for m in [
        Method("none", "Stage-1 classifier", "identity", description="the stage-1 classifier unchanged"),
        Method(
            "ce",
            "CE fine-tune",
            "trained",
            {"loss": "ce", "weight_decay": 0.0, "maxnorm": False},
            description="fine-tune the classifier with plain cross-entropy",
        ),
        Method(
            "l2-norm",
            "L2-norm",
            "posthoc",
            {"tau": 1.0},
            transform="tau-norm",
            description="unit-norm classifier rows (tau-normalisation with tau = 1), no training",
        ),
        Method(
            "tau-norm",
            "τ-norm",
            "posthoc",
            {},
            transform="tau-norm",
            description="w_c / ||w_c||^tau with tau picked on the selection split (Kang et al.)",
        ),
        Method(
            "cb",
            "CB",
            "trained",
            {"loss": "cb", "weight_decay": 0.0, "maxnorm": False},
            description="class-balanced loss, no weight decay, no MaxNorm",
        ),
        Method(
            "cb-wd",
            "CB + WD",
            "trained",
            {"loss": "cb", "maxnorm": False},
            description="class-balanced loss with (searched) weight decay",
        ),
        Method(
            "cb-maxnorm",
            "CB + MaxNorm",
            "trained",
            {"loss": "cb", "weight_decay": 0.0, "maxnorm": True},
            description="class-balanced loss with a (searched) MaxNorm threshold",
        ),
        Method(
            "wb",
            "CB + WD + MaxNorm (WB)",
            "trained",
            {"loss": "cb", "maxnorm": True},
            description="the weight-balancing method: class-balanced loss, weight decay and MaxNorm",
        ),
        Method(
            "crt",
            "cRT",
            "trained",
            {"loss": "ce", "classifier_init": "reinit", "sampler": "class-balanced", "maxnorm": False},
            description="classifier re-training: re-initialised classifier, class-balanced sampling, CE",
        ),
        Method(
            "lws",
            "LWS",
            "trained",
            {"loss": "ce", "sampler": "class-balanced", "maxnorm": False},
            head="lws",
            description="learnable weight scaling: per-class scales on the frozen classifier",
        ),
        Method("ncm", "NCM", "ncm", description="nearest class mean of centred, L2-normalised features"),
        Method(
            "la-add",
            "Logit adj. (add.)",
            "posthoc",
            {},
            transform="la-add",
            description="z_c - tau log pi_c, tau picked on the selection split (Menon et al.)",
        ),
        Method(
            "la-mul",
            "Logit adj. (mult.)",
            "posthoc",
            {},
            transform="la-mul",
            description="z_c * pi_c^(-tau), tau picked on the selection split (Hasegawa & Sato)",
        ),
    ]:
        register_method(
            m.name,
            label=m.label,
            description=m.description,
            preset=m.preset,
            kind=m.kind,
            head=m.head,
            transform=m.transform,
        )


METHODS = _REGISTRY_METHODS
"""Name -> :class:`Method`: the built-ins below, then any plug-in's (``study.register_method``)."""

_register_builtins()

ABLATION_ORDER = [
    "none",
    "ce",
    "l2-norm",
    "tau-norm",
    "cb",
    "cb-wd",
    "cb-maxnorm",
    "wb",
    "crt",
    "lws",
    "ncm",
    "la-add",
    "la-mul",
]
"""Row order of the ablation table (methods a study did not run are left out)."""


def get_method(name: str) -> Method:
    """The registered method ``name`` (an unknown name is a UserError listing the valid ones)."""
    return METHODS[name]

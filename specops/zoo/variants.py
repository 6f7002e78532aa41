"""The ResNet variants of the PyHessian study by name, without importing a framework.

Each name maps to ``(label, batch norm per stage, residual connections per stage)``;
:func:`specops.zoo.torch_resnet.resnet` builds them (``variant="no-bn-s3"``), and the
labels are those of the paper's tables (Yao et al. 2020, Tables II-III).
"""

#: The study's variants: name -> (label, batch norm per stage, residual per stage).
VARIANTS = {
    "baseline": ("ResNet", (True, True, True), (True, True, True)),
    "no-bn": ("RM BN", (False, False, False), (True, True, True)),
    "no-res": ("RM Res", (True, True, True), (False, False, False)),
    "no-bn-no-res": ("RM BN + Res", (False, False, False), (False, False, False)),
    **{f"no-bn-s{s}": (f"RM BN stage {s}", tuple(t != s for t in (1, 2, 3)), (True, True, True))
       for s in (1, 2, 3)},
    **{f"no-res-s{s}": (f"RM Res stage {s}", (True, True, True), tuple(t != s for t in (1, 2, 3)))
       for s in (1, 2, 3)},
}

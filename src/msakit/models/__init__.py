"""Model zoo. Importing a model file registers it (see msakit.registry)."""

from msakit.models import (  # noqa: F401
    bc_lstm,
    dbr,
    lf_dnn,
    lmf,
    misa,
    mmcl,
    mult,
    pase,
    psa_mf,
    self_mm,
    text_baseline,
    tfn,
    unimodal,
)

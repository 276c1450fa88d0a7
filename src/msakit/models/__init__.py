"""Model zoo. Importing a model file registers it (see msakit.registry)."""

from msakit.models import (  # noqa: F401
    bc_lstm,
    lf_dnn,
    lmf,
    misa,
    mult,
    pase,
    self_mm,
    tfn,
    unimodal,
)

"""Model zoo. Importing a model file registers it (see msakit.registry)."""

from msakit.models import lf_dnn, tfn, unimodal  # noqa: F401

"""Editing methods, one folder each; importing this package registers them all."""

from . import (  # noqa: F401
    alphaedit,
    calinet,
    ft,
    grace,
    ike,
    ke,
    kn,
    memit,
    mend,
    rome,
    serac,
    tpatcher,
)

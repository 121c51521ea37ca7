"""Editing methods, one folder each; importing this package registers them all."""

from . import ft  # noqa: F401

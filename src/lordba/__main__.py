"""``python -m lordba`` runs the command line."""

from lordba.cli import entry_point

entry_point()

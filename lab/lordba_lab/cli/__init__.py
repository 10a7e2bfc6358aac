"""The lab's ``lordba`` subcommands, registered as ``lordba.commands`` entry points (lab/pyproject.toml)."""

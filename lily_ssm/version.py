"""lily-ssm's version, in one place (the package metadata and `lily-ssm env` read it)."""

__version__ = "0.1.0"

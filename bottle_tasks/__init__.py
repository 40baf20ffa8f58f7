"""claude-bottle: run an AI coding agent in an isolated guest behind a sidecar bundle."""

__version__ = "0.1.0"

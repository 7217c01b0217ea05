"""`ibscope run` (being built)."""


def register(app) -> None:
    """Add this module's commands to the app."""

"""Errors raised by the placement package.

Glossary: every user-facing failure (bad trace, impossible constraints, mismatched placement) is a
`PlacementError`. It subclasses `ValueError` so the main CLI prints ``error: <message>`` and exits 2.
"""


class PlacementError(ValueError):
    """Bad input or an impossible placement request; the message says which input and why."""

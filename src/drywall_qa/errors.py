"""The one base of the project's errors: a problem with an input or a parameter that the user can
fix. Every stage reports one the same way (`drywall_qa.stage`): `<stage>: <message>`, exit code 1."""

from __future__ import annotations


class DrywallQAError(Exception):
    """A problem the user can fix; the message names the file, key or value at fault."""

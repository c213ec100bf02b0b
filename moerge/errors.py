"""The one error type users see.

Every failure caused by input (a path, a file, a recipe) is raised as a MoergeError whose message is
a single line naming the culprit and the fix; the CLI prints it and exits non-zero, no traceback.
"""


class MoergeError(Exception):
    """A user-facing error: one line that names the file or key and how to fix it."""


class MoergeWarning(UserWarning):
    """A one-line notice about input that is accepted but not used as written (a parameter the method
    ignores, the same tensors under another name); the CLI prints it as ``warning: ...``."""

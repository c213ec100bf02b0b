"""The one error type users see.

Every failure caused by input (a path, a file, a recipe) is raised as a MoergeError whose message is
a single line naming the culprit and the fix; the CLI prints it and exits non-zero, no traceback.
"""


class MoergeError(Exception):
    """A user-facing error: one line that names the file or key and how to fix it."""

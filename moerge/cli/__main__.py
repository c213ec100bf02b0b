"""``python -m moerge.cli``: the ``moerge`` command."""

from moerge.cli import main

main()

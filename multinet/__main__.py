"""``python -m multinet`` is the ``multinet`` command."""
import sys

from .cli import main

sys.exit(main())

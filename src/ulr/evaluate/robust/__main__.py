"""``python -m ulr.evaluate.robust``: the same as ``ulr robust``."""

from .cli import main

raise SystemExit(main())

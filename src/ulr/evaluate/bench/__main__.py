"""``python -m ulr.evaluate.bench``: the same as ``ulr bench``."""

from .cli import main

raise SystemExit(main())

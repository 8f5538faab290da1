"""``python -m ulr``: the same as the ``ulr`` command (see :mod:`ulr.cli`)."""

from .cli import main

raise SystemExit(main())

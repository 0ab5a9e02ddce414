"""``python -m worker.cli``: the ``ichvol`` command line."""

from worker.cli import main

raise SystemExit(main())

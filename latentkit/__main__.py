"""``python -m latentkit`` runs the ``latentkit`` command."""

from latentkit.cli import main

raise SystemExit(main())

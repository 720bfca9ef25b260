"""``python -m kit``: the command line (see kit.cli)."""

from kit.cli import main

raise SystemExit(main())

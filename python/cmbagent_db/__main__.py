"""``python -m cmbagent_db``: the migration command line (see cmbagent_db.cli)."""

from cmbagent_db.cli import main

raise SystemExit(main())

"""``python -m cmbagent_db``: the migration command line (see cmbagent_db.cli)."""

from cmbagent_db.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

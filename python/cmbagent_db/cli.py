"""Command line: ``python -m cmbagent_db`` / ``cmbagent-db``.

An Alembic-shaped front end over the public migration functions. Everything
database-related goes through :mod:`cmbagent_db`; this module only parses
arguments, works out which steps a command implies (to report them the way
Alembic does) and turns errors into exit codes:

0 success, 1 any ``cmbagent_db.Error``, 2 usage error, 3 ``check`` found drift.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import List, NoReturn, Optional, Sequence, Tuple

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DRIFT = 3

_EPILOG = """\
targets:
  head              the newest revision
  base              before the first revision (empty schema)
  REV               a revision id, or an unambiguous prefix of one (e.g. 001)
  +N / -N           N revisions up / down from the current one

examples:
  cmbagent-db upgrade                       # bring the database to head
  cmbagent-db --url sqlite:////srv/app.db current
  cmbagent-db history
  cmbagent-db downgrade 001_session_states  # refuses to drop tables holding rows
  cmbagent-db downgrade -1 --force          # ... unless --force is given
  cmbagent-db upgrade head --sql > upgrade.sql
  cmbagent-db downgrade --sql 002_approvals_connections:001_session_states
  cmbagent-db stamp head                    # record a revision without running it
  cmbagent-db check                         # exit 3 if applied SQL differs from this build

The database URL comes from --url, else CMBAGENT_DATABASE_URL, else the SQLite
file under $CMBAGENT_DEFAULT_WORK_DIR/database/cmbagent.db.
exit status: 0 ok, 1 error, 2 usage error, 3 check found drift.
"""

# userinfo of any URL-looking token: scheme://user:password@host. The password
# part is greedy up to the last "@" before whitespace, so a password that itself
# holds "@" is masked whole (over-masking is harmless, leaking is not).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:]*):(?P<pw>\S*)@")
# libpq-style password parameters, in URLs (?password=) or DSNs (password=...)
_PARAM_PASSWORD = re.compile(r"(?P<head>\bpassword=)(?P<pw>[^\s&;']*)", re.IGNORECASE)


class _UsageError(Exception):
    """A command line that parses but makes no sense (reported like argparse's errors)."""


class _CliError(Exception):
    """A problem this module detects itself, reported like a cmbagent_db.Error."""


def _redact(url: str) -> str:
    """``url`` (or any text holding URLs) with passwords replaced by ``***``."""
    text = url if isinstance(url, str) else str(url)
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + ":***@", text)
    return _PARAM_PASSWORD.sub(lambda m: m.group("head") + "***", text)


def _mentions(message: str, url: str) -> bool:
    """Whether ``message`` already names the database of ``url`` (URL or SQLite path)."""
    if url in message or _redact(url) in _redact(message):
        return True
    path = url.split(":///", 1)[1].split("?", 1)[0] if url.startswith("sqlite:///") else ""
    return bool(path) and path in message


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors never echo a password (e.g. a URL given as the command)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_redact(message)}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cmbagent-db",
        description="Manage the schema of a cmbagent database "
        "(Alembic-compatible revisions, bookkeeping in alembic_version).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    url_help = "database URL (default: CMBAGENT_DATABASE_URL or the cmbagent work-dir SQLite file)"
    parser.add_argument("--url", metavar="URL", default=None, help=url_help)

    # --url is also accepted after the command; SUPPRESS keeps it from
    # overwriting a value given before the command.
    common = _Parser(add_help=False)
    common.add_argument("--url", metavar="URL", default=argparse.SUPPRESS, help=url_help)

    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    commands.add_parser(
        "current",
        parents=[common],
        help="show the current revision",
        description="Print the revision the database is at, with ' (head)' when it is the "
        "newest; print nothing when it is at base.",
    )
    commands.add_parser(
        "history",
        parents=[common],
        help="list the revisions, newest first",
        description="List the revision chain newest first, as 'down -> rev, description'.",
    )

    upgrade = commands.add_parser(
        "upgrade",
        parents=[common],
        help="upgrade to a later revision",
        description="Upgrade to TARGET (default head). With --sql, print the SQL instead of "
        "running it; the database is not touched, the range starts at base unless given "
        "as START:TARGET.",
        epilog="examples:\n  cmbagent-db upgrade\n  cmbagent-db upgrade +1\n"
        "  cmbagent-db upgrade --sql\n  cmbagent-db upgrade --sql 001_session_states:head",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    upgrade.add_argument("target", nargs="?", default="head", metavar="TARGET",
                         help="head (default), a revision id, or +N")
    upgrade.add_argument("--sql", action="store_true",
                         help="print the SQL (offline mode) instead of running it")

    downgrade = commands.add_parser(
        "downgrade",
        parents=[common],
        help="revert to an earlier revision",
        description="Downgrade to TARGET. Refuses to drop a table that holds rows unless "
        "--force is given. With --sql, print the SQL for FROM:TO instead of running it.",
        epilog="examples:\n  cmbagent-db downgrade -1\n  cmbagent-db downgrade base --force\n"
        "  cmbagent-db downgrade --sql 002_approvals_connections:001_session_states",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    downgrade.add_argument("target", metavar="TARGET",
                           help="base, a revision id, or -N (with --sql: FROM:TO)")
    downgrade.add_argument("--sql", action="store_true",
                           help="print the SQL (offline mode) instead of running it")
    downgrade.add_argument("--force", action="store_true",
                           help="drop tables even when they hold rows (the rows are lost)")

    stamp = commands.add_parser(
        "stamp",
        parents=[common],
        help="record a revision without running migrations",
        description="Write REV into alembic_version without running any migration "
        "('base' empties it).",
    )
    stamp.add_argument("revision", metavar="REV", help="head, base or a revision id")

    commands.add_parser(
        "check",
        parents=[common],
        help="compare applied migrations with this build (exit 3 on drift)",
        description="List the applied revisions whose SQL differs from this build's; "
        "exit 3 when there are any.",
    )
    return parser


# ---------------------------------------------------------------------------
# revision arithmetic (on the chain reported by cmbagent_db.history())


def _chain() -> List[str]:
    import cmbagent_db

    return list(cmbagent_db.history())


def _position(chain: Sequence[str], rev: Optional[str]) -> int:
    """Index of ``rev`` in ``chain``; -1 for base (None)."""
    if rev is None:
        return -1
    try:
        return chain.index(rev)
    except ValueError:
        # The library raises for a database at an unknown revision before we get
        # here; this is a safety net.
        raise _CliError(f"the database is at revision {rev!r}, which this build does not know")


def _resolve(chain: Sequence[str], spec: str, current_pos: Optional[int]) -> Optional[str]:
    """Turn a target spelling into a revision id, or None for base.

    ``current_pos`` anchors relative targets (+N / -N). Unknown ids are returned
    unchanged so that the library reports them with its own MigrationError.
    """
    if spec == "head":
        return chain[-1] if chain else None
    if spec == "base":
        return None
    rel = re.fullmatch(r"([+-])(\d+)", spec)
    if rel:
        steps = int(rel.group(2)) * (1 if rel.group(1) == "+" else -1)
        anchor = -1 if current_pos is None else current_pos
        dest = anchor + steps
        if dest < -1 or dest >= len(chain):
            at = chain[anchor] if anchor >= 0 else "base"
            raise _CliError(
                f"relative revision {spec} is out of range: from {at} there are "
                f"{len(chain) - 1 - anchor} revision(s) up and {anchor + 1} down"
            )
        return chain[dest] if dest >= 0 else None
    if spec in chain:
        return spec
    matches = [rev for rev in chain if rev.startswith(spec)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise _CliError(f"ambiguous revision {spec!r}: matches {', '.join(matches)}")
    return spec


def _steps(chain: Sequence[str], start: int, end: int) -> List[Tuple[str, str, Optional[str]]]:
    """(direction, from, to) for each step between positions ``start`` and ``end``."""
    def name(pos: int) -> str:
        return chain[pos] if pos >= 0 else ""

    if end > start:
        return [("upgrade", name(pos - 1), name(pos)) for pos in range(start + 1, end + 1)]
    return [("downgrade", name(pos), name(pos - 1)) for pos in range(start, end, -1)]


def _report_steps(chain: Sequence[str], start: int, end: int) -> None:
    import cmbagent_db

    for direction, src, dst in _steps(chain, start, end):
        changed = dst if direction == "upgrade" else src
        description = (cmbagent_db.revision_info(changed).get("description") or "") if changed else ""
        line = f"Running {direction} {src} -> {dst}"
        print(f"{line}, {description}" if description else line, flush=True)


# ---------------------------------------------------------------------------
# commands


def _url(args: argparse.Namespace) -> str:
    if args.url:
        url = args.url
    else:
        import cmbagent_db

        url = cmbagent_db.default_url()
    # Remembered so that a connection error can say which database it was about.
    args.resolved_url = url
    return url


def _cmd_current(args: argparse.Namespace) -> int:
    import cmbagent_db

    url = _url(args)
    rev = cmbagent_db.current(url)
    if rev is not None:
        chain = _chain()
        print(f"{rev} (head)" if chain and rev == chain[-1] else rev)
    _report_foreign(url)
    return EXIT_OK


def _report_foreign(url: str) -> None:
    """Names the revision another Alembic chain (cmbagent's own) keeps in alembic_version,
    beside which this package records its own in cmbagent_db_version."""
    import cmbagent_db

    for rev in cmbagent_db.foreign_revisions(url):
        print(f"alembic_version (another Alembic chain, left as it is): {rev}")


def _cmd_history(args: argparse.Namespace) -> int:
    import cmbagent_db

    chain = _chain()
    for pos in range(len(chain) - 1, -1, -1):
        rev = chain[pos]
        info = cmbagent_db.revision_info(rev)
        down = info.get("down_revision") or "<base>"
        head = " (head)" if pos == len(chain) - 1 else ""
        description = info.get("description") or ""
        print(f"{down} -> {rev}{head}, {description}")
    return EXIT_OK


def _split_range(spec: str, command: str) -> Tuple[Optional[str], str]:
    if ":" not in spec:
        return None, spec
    start, _, end = spec.partition(":")
    if not start or not end or ":" in end:
        raise _UsageError(f"{command} --sql range must be FROM:TO, got {spec!r}")
    return start, end


def _print_sql(url: str, target: Optional[str], start: Optional[str]) -> None:
    import cmbagent_db

    sql = cmbagent_db.migration_sql(url, target if target is not None else "base",
                                    start=start if start is not None else "base")
    sys.stdout.write(sql if sql.endswith("\n") or not sql else sql + "\n")


def _migrate(
    url: str, chain: Sequence[str], before: int, dest: Optional[str], force: bool
) -> int:
    """Run the migration from position ``before`` to ``dest``; report each step that happened."""
    import cmbagent_db

    target = dest if dest is not None else "base"
    try:
        after_rev = cmbagent_db.migrate(url, target, force=force)
    except cmbagent_db.Error:
        # Report the revisions that did complete (each runs in its own
        # transaction) before the error itself.
        try:
            _report_steps(chain, before, _position(chain, cmbagent_db.current(url)))
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    _report_steps(chain, before, _position(chain, after_rev))
    return EXIT_OK


def _cmd_upgrade(args: argparse.Namespace) -> int:
    import cmbagent_db

    chain = _chain()
    if args.sql:
        start_spec, end_spec = _split_range(args.target, "upgrade")
        start = _resolve(chain, start_spec, None) if start_spec else None
        end = _resolve(chain, end_spec, _known_position(chain, start))
        _print_sql(_url(args), end, start)
        return EXIT_OK
    if ":" in args.target:
        raise _UsageError("a FROM:TO range is only allowed with --sql")
    if args.target.startswith("-"):
        raise _UsageError(f"upgrade target {args.target!r} goes down; use downgrade")
    url = _url(args)
    cur = _position(chain, cmbagent_db.current(url))
    dest = _resolve(chain, args.target, cur)
    if dest in chain or dest is None:
        dest_pos = _position(chain, dest)
        if dest_pos < cur:
            raise _CliError(
                f"{args.target} is not an upgrade target from the current revision "
                f"{chain[cur]}; use downgrade"
            )
    return _migrate(url, chain, cur, dest, force=False)


def _cmd_downgrade(args: argparse.Namespace) -> int:
    import cmbagent_db

    chain = _chain()
    if args.sql:
        start_spec, end_spec = _split_range(args.target, "downgrade")
        if start_spec is None:
            raise _UsageError(
                "downgrade --sql needs a FROM:TO range, e.g. "
                "downgrade --sql 002_approvals_connections:001_session_states"
            )
        start = _resolve(chain, start_spec, None)
        end = _resolve(chain, end_spec, _known_position(chain, start))
        _print_sql(_url(args), end, start if start is not None else "base")
        return EXIT_OK
    if ":" in args.target:
        raise _UsageError("a FROM:TO range is only allowed with --sql")
    if args.target.startswith("+") or args.target == "head":
        raise _UsageError(f"downgrade target {args.target!r} goes up; use upgrade")
    url = _url(args)
    cur = _position(chain, cmbagent_db.current(url))
    dest = _resolve(chain, args.target, cur)
    if dest in chain:
        dest_pos = _position(chain, dest)
        if dest_pos > cur:
            at = chain[cur] if cur >= 0 else "base"
            raise _CliError(
                f"{args.target} is not a downgrade target from the current revision {at}; "
                "use upgrade"
            )
    try:
        return _migrate(url, chain, cur, dest, force=args.force)
    except cmbagent_db.MigrationError as exc:
        text = str(exc)
        if not args.force and "row" in text.lower() and "--force" not in text:
            raise _CliError(f"{text} (use --force to drop the rows anyway)") from exc
        raise


def _known_position(chain: Sequence[str], rev: Optional[str]) -> Optional[int]:
    """Position of a resolved revision, None when unknown (the library will say so)."""
    if rev is None:
        return -1
    return chain.index(rev) if rev in chain else None


def _cmd_stamp(args: argparse.Namespace) -> int:
    import cmbagent_db

    chain = _chain()
    if re.fullmatch(r"[+-]\d+", args.revision):
        raise _UsageError("stamp needs an absolute revision (head, base or a revision id)")
    url = _url(args)
    dest = _resolve(chain, args.revision, None)
    try:
        before = cmbagent_db.current(url)
    except cmbagent_db.Error:
        # stamp is how one repairs a database whose recorded revision is
        # unknown; not being able to read it is no reason to refuse.
        before = None
    cmbagent_db.stamp(url, dest if dest is not None else "base")
    print(f"Running stamp_revision {before or ''} -> {dest or ''}")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    import cmbagent_db

    url = _url(args)
    drifted = list(cmbagent_db.check(url))
    _report_foreign(url)
    if not drifted:
        print("No drift: the applied migrations match this build.")
        return EXIT_OK
    for rev in drifted:
        print(rev)
    print(
        f"drift: the SQL applied for {len(drifted)} revision(s) differs from this build's: "
        + ", ".join(drifted),
        file=sys.stderr,
    )
    return EXIT_DRIFT


_COMMANDS = {
    "current": _cmd_current,
    "history": _cmd_history,
    "upgrade": _cmd_upgrade,
    "downgrade": _cmd_downgrade,
    "stamp": _cmd_stamp,
    "check": _cmd_check,
}


def _fail(message: str) -> int:
    print(f"error: {_redact(message)}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    try:
        import cmbagent_db
    except ImportError as exc:
        return _fail(f"cannot load cmbagent_db: {exc}")

    try:
        return _COMMANDS[args.command](args)
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {_redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except _CliError as exc:
        return _fail(str(exc))
    except cmbagent_db.Error as exc:
        message = str(exc) or type(exc).__name__
        url = getattr(args, "resolved_url", None)
        if url and isinstance(exc, cmbagent_db.OperationalError) and not _mentions(message, url):
            message = f"{message}\n  database: {url}"
        return _fail(message)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

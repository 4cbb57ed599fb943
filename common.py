"""What every entry point shares: turning a user's mistake into one line instead of a traceback.

    from common import cli
    if __name__ == "__main__":
        cli(main)          # main() parses its own flags
"""
import sys

from data import DataError
from model import CheckpointError


class UserError(ValueError):
    """A flag, path or run directory that cannot be used (a user's mistake, not a bug)."""


USER_ERRORS = (UserError, DataError, CheckpointError)  # anything else is a bug and keeps its traceback


def cli(main, argv=None):
    """Run main(argv); a user error prints `error: <message>` on one line and exits with status 2."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

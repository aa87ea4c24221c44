"""One clear line for bad input: the scripts raise UserError, `run_main` prints it and exits 2."""

import sys


class UserError(Exception):
    """Something the user can fix (a bad file, a wrong path, a bad flag). Message: one line."""


class TrainingDiverged(Exception):
    """The loss or the score became NaN/inf; the last good checkpoint is kept."""


def run_main(main):
    """Call `main()`; turn UserError into one line on stderr and exit status 2, no traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        sys.exit(3)

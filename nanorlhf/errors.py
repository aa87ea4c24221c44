"""One clear line for bad input: the scripts raise UserError, `run_main` prints it and exits 2."""

import sys


class UserError(Exception):
    """Something the user can fix (a bad file, a wrong path, a bad flag). Message: one line."""


class TrainingDiverged(Exception):
    """The loss or the score became NaN/inf; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Ctrl-C stopped the training loop after a whole step, and a checkpoint of it was saved."""


def run_main(main):
    """Call `main()`; turn UserError into one line on stderr and exit status 2, no traceback
    (3 for a diverged run, 130 for Ctrl-C, as a shell reports SIGINT)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        sys.exit(3)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # outside the training loop (loading, final save), or Ctrl-C twice
        print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(130)

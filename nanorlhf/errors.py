"""One clear line for bad input: the scripts raise UserError, `run_main` prints it and exits 2.

Exit status of every script: 0 done, 2 bad input (UserError), 3 training diverged, 4 the file system
refused (disk full, read-only, no permission: SaveFailed, or such an OSError), 130 interrupted (Ctrl-C).
"""

import errno
import sys


class UserError(Exception):
    """Something the user can fix (a bad file, a wrong path, a bad flag). Message: one line."""


class TrainingDiverged(Exception):
    """The loss or the score became NaN/inf; the last good checkpoint is kept."""


class SaveFailed(Exception):
    """Writing a checkpoint, a model or a file failed (disk full, read-only, no permission); what was
    half-written is removed and earlier checkpoints are untouched."""


# The OSErrors the machine causes, not the program: reported as one line with exit status 4.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class Interrupted(Exception):
    """Ctrl-C stopped the training loop after a whole step, and a checkpoint of it was saved."""


def run_main(main):
    """Call `main()`; turn UserError into one line on stderr and exit status 2, no traceback
    (3 for a diverged run, 4 when the file system refused, 130 for Ctrl-C, as a shell reports SIGINT)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        sys.exit(3)
    except SaveFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(4)
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        print(f"error: {e.filename or 'writing'}: {e.strerror}", file=sys.stderr)
        sys.exit(4)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # outside the training loop (loading, final save), or Ctrl-C twice
        print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(130)

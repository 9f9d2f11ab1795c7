"""What every command shares: a user error is one line on stderr and exit code 2; Ctrl-C is
one line and 130, the shell's code for SIGINT (each command's own cleanup has run by then); a
missing optional package is one line naming the extra that installs it (common/extras.py)."""

import functools
import os
import sys

from symnoise_megatron.common.extras import missing_package_line

# Errors that name a bad file, row, flag or checkpoint: shown without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def exits_on_user_error(main):
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except USER_ERRORS as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            say(f"error: {message}")
            return 2
        except ModuleNotFoundError as error:
            line = missing_package_line(error.name)
            if line is None:  # a module of this package, or one nothing installs: a bug, with its traceback
                raise
            say(f"error: {line}")
            return 2
        except KeyboardInterrupt:
            say("interrupted")
            return 130

    return wrapped


def say(line: str) -> None:
    """One write per line, so that the ranks of a torchrun job never splice their lines together;
    a rank other than 0 names itself (an error only one node's files cause must not go unsaid)."""
    rank = os.environ.get("RANK", "0")
    sys.stderr.write(("" if rank == "0" else f"[rank {rank}] ") + line + "\n")
    sys.stderr.flush()

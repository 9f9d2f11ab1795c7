"""What every command shares: a user error is one line on stderr and exit code 2; Ctrl-C is
one line and 130, the shell's code for SIGINT (each command's own cleanup has run by then)."""

import functools
import sys

# Errors that name a bad file, row, flag or checkpoint: shown without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def exits_on_user_error(main):
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except USER_ERRORS as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            print(f"error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped

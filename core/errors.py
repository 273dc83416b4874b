"""Errors a user can cause, and how a command-line tool reports them.

Every mistake a user can make (a bad setting, a malformed shard, a checkpoint of another model)
raises a subclass of `UserError`. The entry points catch it with `exit_on_user_error` and print
one line, `error: ...`, then exit with status 2: no traceback for a typo.
"""

import functools
import sys


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(UserError, ValueError):
    """An invalid setting: the message names the setting and the value."""


class CheckpointError(UserError, ValueError):
    """A missing, corrupt or mismatched checkpoint."""


class ArtifactError(UserError, ValueError):
    """A corrupt int8+zlib artifact, or weights that cannot be packed into one."""


class TrainingError(UserError):
    """A run that cannot go on (a diverged loss, an interruption): said in one line, checkpoints kept."""


class RankError(UserError):
    """One rank of several failed on its own (an unexpected error): said in one line naming the rank."""


class DatasetError(UserError, ValueError):
    """A missing or inconsistent dataset or tokenizer."""


def exit_on_user_error(main):
    """Decorate a `main()` so a UserError becomes `error: <message>` and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            message = " ".join(str(e).split())  # always one line
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, in one line, as a shell expects (130)
            print("\nerror: stopped at once (a second Ctrl-C); the step under way and its checkpoint were not "
                  "written, earlier checkpoints are kept", file=sys.stderr)
            sys.exit(130)

    return wrapper

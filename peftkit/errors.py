"""The one exception type for user mistakes.

Everything a user can fix (a bad key, a missing file, an impossible combination) is raised as
:class:`UserError`. The CLI turns it into one paragraph on stderr and exit code 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix; the message names the culprit and the fix."""



def guarded(action: Callable[[], object], *, debug: bool = False) -> int:
    """Run ``action``; a :class:`UserError` becomes one paragraph on stderr and exit code 2.

    ``debug=True`` (the ``--debug`` flag) re-raises it, so the traceback is shown.
    """
    import sys
    import textwrap

    try:
        action()
    except UserError as err:
        if debug:
            raise
        print("\n" + textwrap.fill(f"peftkit: error: {err}", width=110, break_long_words=False, break_on_hyphens=False), file=sys.stderr)
        return EXIT_USER_ERROR
    return 0

"""The one exception type users see.

Anything a user can cause (unknown model, bad flag, corrupt file, no disk, no network, prompt longer
than the context) raises ``MoeinfError`` with a one-line message that names the problem and the fix.
The CLI prints it as ``Error: <message>`` and exits non-zero, without a traceback.
"""


class MoeinfError(Exception):
    """A user-facing error: ``str(err)`` is one line naming the problem and the fix."""

    exit_code = 1

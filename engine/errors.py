"""The one exception type users see.

Anything a user can cause (unknown model, bad flag, corrupt file, no disk, no network, prompt longer
than the context) raises ``MoeinfError`` with a one-line message that names the problem and the fix.
The CLI prints it as ``Error: <message>`` and exits non-zero, without a traceback.
"""


class MoeinfError(Exception):
    """A user-facing error: ``str(err)`` is one line naming the problem and the fix."""

    exit_code = 1


_FIX = {
    "EROFS": "the file system is read-only; set MOEINF_HOME to a writable directory",
    "EACCES": "permission denied; check the permissions there or set MOEINF_HOME to a directory of yours",
    "EPERM": "not permitted; check the permissions there or set MOEINF_HOME to a directory of yours",
    "ENOSPC": "the disk is full; free some space or set MOEINF_HOME to a bigger disk",
    "EDQUOT": "the disk quota is exhausted; free some space or set MOEINF_HOME to another disk",
    "ENOTDIR": "a file stands where a directory belongs; move that file away",
    "EEXIST": "a file stands where a directory belongs; move that file away",
    "EISDIR": "a directory stands where a file belongs; give a file name",
}


def os_error(err: OSError, doing: str = "") -> MoeinfError:
    """A MoeinfError for an OSError the environment caused (read-only or full disk, permissions, a file
    where a directory belongs): what failed, on which path, and the fix. ``doing``: e.g. "saving traces"."""
    import errno

    name = errno.errorcode.get(err.errno or 0, "")
    what = f"{doing}: " if doing else ""
    fix = _FIX.get(name, "check that path and try again")
    if not err.filename:  # e.g. a write that found the disk full
        return MoeinfError(f"{what}{err.strerror or err}; {fix}")
    return MoeinfError(f"{what}cannot use {err.filename} ({err.strerror or err}); {fix}")

"""Files written so that a crash, a kill or a full disk never leaves half of one."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path, suffix: str = ""):
    """Yield a temporary path beside `path` to write; when the block ends
    without an error it replaces `path` in one rename, so readers see the old
    file or the new one, never half; otherwise it is removed. OSError (a
    missing directory, a full disk) reaches the caller."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

"""Secrets of ``stickystate node`` / ``stickystate router``, never from the command line.

A process's command line is readable by every user of the machine (``ps``,
``/proc/<pid>/cmdline``); its environment and a file with mode 0600 are readable only by
its owner. So the internal secret comes from ``STICKYSTATE_INTERNAL_SECRET`` or from
``--internal-secret-file PATH``, and API keys from ``STICKYSTATE_API_KEYS`` and/or
``--api-keys-file PATH``; a file that its group or others may read or write is refused.
The master keys of encryption (issue 14) come from ``STICKYSTATE_MASTER_KEYS`` or
``--master-keys-file PATH`` the same way. The old ``--internal-secret VALUE`` and
``--api-keys VALUE`` flags, and ``--master-keys VALUE``, are refused with a
message saying how to pass the value instead (``cli.py``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from stickystate.auth import AuthConfigError, parse_keys

SECRET_ENV = "STICKYSTATE_INTERNAL_SECRET"
KEYS_ENV = "STICKYSTATE_API_KEYS"
SECRET_FILE_ENV = "STICKYSTATE_INTERNAL_SECRET_FILE"
KEYS_FILE_ENV = "STICKYSTATE_API_KEYS_FILE"
MASTER_KEYS_ENV = "STICKYSTATE_MASTER_KEYS"
MASTER_KEYS_FILE_ENV = "STICKYSTATE_MASTER_KEYS_FILE"
#: Every variable that carries a secret or names a secret file (``up`` sets its own).
ALL_ENV = (SECRET_ENV, KEYS_ENV, SECRET_FILE_ENV, KEYS_FILE_ENV, MASTER_KEYS_ENV, MASTER_KEYS_FILE_ENV)

REFUSED_FLAGS = {
    "--internal-secret": f"set {SECRET_ENV} or pass --internal-secret-file PATH (a file only its owner may read: chmod 600)",
    "--api-keys": f"set {KEYS_ENV}=key=tenant,... or pass --api-keys-file PATH (a file only its owner may read: chmod 600)",
    "--master-keys": f"set {MASTER_KEYS_ENV}=kid:base64,... or pass --master-keys-file PATH (a file only its owner may "
                     "read: chmod 600)",
}


class SecretError(ValueError):
    """A secret given the wrong way (on the command line, in a file others may read, twice)."""


def refused_flag_message(flag: str) -> str:
    return (f"{flag} is no longer accepted: a value on the command line is visible to every user of "
            f"this machine (ps, /proc/<pid>/cmdline); {REFUSED_FLAGS[flag]}")


def read_private_file(path: str) -> str:
    """The text of ``path``, which only its owner may read or write (mode 0600 or 0400)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise SecretError(f"{path} is readable or writable by its group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        return Path(path).read_text()
    except OSError as exc:
        raise SecretError(f"cannot read {path}: {exc.strerror}") from None


def internal_secret(file: str, env: Mapping[str, str] | None = None) -> str:
    """The internal secret from ``STICKYSTATE_INTERNAL_SECRET`` or from ``file`` ("" if neither)."""
    value = (os.environ if env is None else env).get(SECRET_ENV, "")
    if file and value:
        raise SecretError(f"the internal secret is given twice ({SECRET_ENV} and --internal-secret-file): give one")
    if file:
        value = read_private_file(file).strip()
        if not value:
            raise SecretError(f"{file} is empty: expected the internal secret")
    return value


def api_keys(file: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """{key: tenant} from ``--api-keys-file`` (``key tenant`` lines) merged with
    ``STICKYSTATE_API_KEYS`` (``key=tenant,...``; an entry there wins for the same key)."""
    inline = (os.environ if env is None else env).get(KEYS_ENV, "")
    keys: dict[str, str] = {}
    try:
        if file:
            keys.update(parse_keys(read_private_file(file), sep=" "))
        if inline:
            keys.update(parse_keys(inline, sep="="))
    except AuthConfigError as exc:
        raise SecretError(str(exc)) from None
    return keys


"""The base class of every error that means bad input rather than a bug.

A bad config, audio file, corpus, manifest, checkpoint or code file raises a subclass of
`SfmError` whose message is one line naming the file or key and the reason. The CLI prints
such errors as `sfm: error: <message>` and exits with status 2; library users can catch
`SfmError` to tell a user's mistake from a failure of sfm itself. Imports nothing.
"""

from __future__ import annotations


class SfmError(Exception):
    """Bad input: the message is one line naming the file, field or key and what is wrong."""


class ConfigError(SfmError, ValueError):
    """A bad config file, key, value or override; the message is one line naming it."""


def first_line(err: BaseException) -> str:
    """The first non-blank line of an error's message (its type's name when it has none):
    what a one-line error keeps of a library's multi-line one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__

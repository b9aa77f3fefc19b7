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

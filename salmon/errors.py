"""The one error hierarchy of salmon, on the ground floor so that every package can raise it.

- :class:`UserError`: bad input the user can fix (a config field, a file, a flag, a principle set);
  the message says what to fix. The CLI prints it as one line and exits 2; the service maps its
  own subclasses (``rm_service.errors``) to 4xx responses.
- :class:`Unavailable`: something the run depends on stayed unreachable past its retry budget
  (the reward service); ``retryable`` says whether trying again later can help. Exit 3.

Library code raises these and never imports the CLI; ``salmon_cli.main`` maps them to exit codes in
one place.
"""

from __future__ import annotations


class SalmonError(Exception):
    """Base of every error salmon raises on purpose."""

    exit_code = 1
    retryable = False


class UserError(SalmonError, ValueError):
    """Input the user can fix; the message names the file, field or flag and what is wrong."""

    exit_code = 2


class Unavailable(SalmonError):
    """A service the run needs stayed unreachable; a later retry may succeed."""

    exit_code = 3
    retryable = True


__all__ = ["SalmonError", "Unavailable", "UserError"]

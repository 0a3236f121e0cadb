"""Errors a user can fix. The CLI prints their message and exits non-zero, without a traceback."""


class UserError(ValueError):
    """Bad input or configuration; the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """Invalid flags or combination of flags."""


class TemplateError(UserError):
    """A chat template that cannot be used to render or mask a conversation."""


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGUSR1) before training started: unwinds like Ctrl-C's KeyboardInterrupt, so
    temporary files are removed on the way out, and the CLI exits 143 without a traceback. A BaseException, so no
    `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

"""Errors a user can fix. The CLI prints their message and exits non-zero, without a traceback."""


class UserError(ValueError):
    """Bad input or configuration; the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """Invalid flags or combination of flags."""


class TemplateError(UserError):
    """A chat template that cannot be used to render or mask a conversation."""

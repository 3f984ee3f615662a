"""Exception types shared by every stage.

AttngenError is the base of everything attngen raises on purpose; InputError marks bad user input (a pattern,
an argument, an arch string) and is also a ValueError so generic callers can catch it as one."""


class AttngenError(Exception):
    """Base class of the errors attngen raises deliberately."""


class InputError(AttngenError, ValueError):
    """A value supplied by the user is invalid; the message says which and what is accepted."""


class CacheWarning(UserWarning):
    """The disk cache could not be used as intended (unwritable, corrupt entry); attngen carried on."""

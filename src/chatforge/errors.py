"""User-facing errors: the CLI prints these as one line (no traceback) and exits with status 2."""


class ChatforgeError(Exception):
    """Bad input from the user (a file, a config, a request): the message says what and where."""

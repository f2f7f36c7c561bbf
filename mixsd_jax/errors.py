"""The one exception type users see: a single line naming the file, line, field or key at fault."""


class MixsdError(Exception):
    """Bad input or an impossible request. The CLI prints `error: <message>` and exits with 2."""

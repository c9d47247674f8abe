"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class KdqError(Exception):
    """Bad input or state the user can fix; the message says how."""

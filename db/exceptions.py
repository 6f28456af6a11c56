"""Errors raised by the db package."""


class DatabaseError(Exception):
    """Root of the db package's errors."""


class InvalidTransition(DatabaseError):
    """A state change that the state machine does not allow."""

    def __init__(self, kind: str, current: str, target: str) -> None:
        super().__init__(f"{kind}: transition {current} -> {target} is not allowed")
        self.kind = kind
        self.current = current
        self.target = target


class DatabaseUnreachable(DatabaseError):
    """The database cannot be reached at start (server down, wrong host, refused login).

    ``url`` is the configured URL with its password hidden; ``reason`` the driver's first line.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the database at {url}: {reason}")
        self.url = url
        self.reason = reason

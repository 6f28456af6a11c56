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

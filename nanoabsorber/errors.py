"""The user-facing errors: each prints as one line ("error: <message>") with exit status 2 from
the scripts (nanoabsorber.cli.run), never as a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, a flag value): one line, exit status 2."""


class ConfigError(UserError, ValueError):
    """A setting with a bad value; `name` is the setting (a dataclass field)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name, self.problem = name, problem


class CheckpointError(UserError):
    """A one-line, user-facing problem with a checkpoint file: '<path>: <problem>'."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem

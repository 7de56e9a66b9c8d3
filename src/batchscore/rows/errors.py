"""The error every reader of user input raises: it names the file, column and row."""


class InputError(ValueError):
    """The input cannot be used as given; the message says where and why."""

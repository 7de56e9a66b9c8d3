"""Why a version was not published: the pointer stayed where it was."""


class PublishError(RuntimeError):
    """The new version is incomplete or lost keys; `current` was left where it was."""


class SupersededError(PublishError):
    """A newer version went live while this one was being written: it can never be published."""

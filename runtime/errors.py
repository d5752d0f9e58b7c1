"""Typed errors. Each message names the fix; CLIs print it as one line and exit non-zero."""


class StdrcError(Exception):
    """Base of every error the CLIs turn into one clear line."""


class BundleError(StdrcError):
    """A bundle is missing, truncated, corrupt, from another format version or another machine."""


class InputError(StdrcError):
    """A user input (image, prompt, size, steps, output path) cannot be used."""


class NoFaceError(InputError):
    """No face was found in the reference photo."""


class BackendUnavailableError(StdrcError):
    """The requested backend cannot run here (package missing, no GPU)."""

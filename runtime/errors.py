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


def require_extra(module: str, extra: str, command: str) -> None:
    """Import `module` or raise one line naming the extra that installs it.

    Only the package itself being absent counts as missing: an ImportError raised inside it (or inside
    stdrc) propagates, so a broken install is never mistaken for a missing extra.
    """
    import importlib

    top = module.split(".")[0]
    try:
        importlib.import_module(module)
    except ImportError as e:
        if (e.name or "").split(".")[0] != top:
            raise
        raise BackendUnavailableError(f"{command} needs {top}, which is not installed here: "
                                      f'pip install "stdrc[{extra}]"') from None

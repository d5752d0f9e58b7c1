"""`pytest -n 2`'s work units: in a module of its own so that tests/conftest.py and tests/test_xdist_groups.py
share it (a test importing `conftest` gets whichever conftest.py comes first on sys.path, e.g. tests/cpp's)."""

# Under pytest-xdist (`-n 2`) each test file is one unit of work, except these groups, each run whole on one
# worker: the tests that need GBs of memory and disk (never two at once), those sharing the aoti bundles and the
# C++ build (built once), and those that start Ray, Serve or the app (one cluster at a time).
XDIST_GROUPS = {
    "heavy": ("tests/engines/test_ltx2_reduced.py", "tests/export/test_dit_ltx23.py", "tests/export/test_text_ltx23.py",
              "tests/benchmarks/test_build_memory.py"),
    "aoti": ("tests/cpp/", "tests/engines/test_aoti.py"),
    "ray": ("tests/serve/", "tests/app/", "tests/benchmarks/test_serve_load_smoke.py"),
}
XDIST_ORDER = ("heavy", "aoti", None, "ray")  # handed out longest first, so no worker is left alone with one at the end


def xdist_group(file: str) -> str | None:
    return next((name for name, paths in XDIST_GROUPS.items() if file.startswith(paths)), None)

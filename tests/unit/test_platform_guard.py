"""platform/ is a source folder, not a package: it must never shadow the standard library."""

import platform


def test_platform_is_still_the_standard_library_module() -> None:
    assert platform.python_version().startswith("3.")
    assert not hasattr(platform, "keel")


def test_public_api_resolves_lazily() -> None:
    import subprocess
    import sys

    import keel

    assert all(getattr(keel, name) is not None for name in keel.__all__)
    cold = subprocess.run([sys.executable, "-c", "import keel, sys; print('torch' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert cold.stdout.strip() == "False"  # importing keel alone must not pull in torch

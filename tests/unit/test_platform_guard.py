"""platform/ is a source folder, not a package: it must never shadow the standard library."""

import platform

from tests.processes import modules_loaded_by


def test_platform_is_still_the_standard_library_module() -> None:
    assert platform.python_version().startswith("3.")
    assert not hasattr(platform, "keel")


def test_public_api_resolves_lazily() -> None:
    import keel

    assert all(getattr(keel, name) is not None for name in keel.__all__)
    assert modules_loaded_by("import keel", ("torch",)) == []  # importing keel alone must not pull in torch

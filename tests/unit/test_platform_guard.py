"""platform/ is a source folder, not a package: it must never shadow the standard library."""

import platform


def test_platform_is_still_the_standard_library_module() -> None:
    assert platform.python_version().startswith("3.")
    assert not hasattr(platform, "keel")

"""The other libraries' private names this project uses (run/library_internals.py) are still there: an upgrade
that removes one fails here, naming it and the code to update, not deep inside a run."""

from importlib.metadata import PackageNotFoundError, version

import pytest

from lightning_modules.run.library_internals import INTERNALS, Internal


def installed(library: str) -> str:
    try:
        return version(library)
    except PackageNotFoundError:
        return "(not a package)"


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: i.name.split(":")[-1])
def test_a_private_name_this_project_uses_is_still_there(internal: Internal):
    assert internal.present(), (
        f"{internal.library} {installed(internal.library)} has no {internal.name} (this project was written against "
        f"{internal.written_against}); update {internal.used_by}"
    )


def test_a_missing_name_is_reported_not_raised():
    gone = Internal("torch", "2.14", "torch:nn.NoSuchModule", "nothing")
    assert not gone.present()

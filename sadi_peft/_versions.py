"""Supported versions of torch, transformers and peft, checked once when ``sadi_peft`` is imported.

The ranges are the ones declared in ``pyproject.toml`` (a test keeps both in step). pip enforces them on install, but
an environment can drift afterwards (``pip install -U transformers``, a conda solve, ``--no-deps``), and a version
outside the range fails somewhere deep inside PEFT or transformers (e.g. transformers 5.24 refuses peft 0.21 in
``add_adapter`` with "The version of PEFT you are using is not compatible"). :func:`check_versions` turns that into
one :class:`ImportError` at ``import sadi_peft`` that names the installed version, the supported range and the pip
command that fixes it.

It reads the installed versions from the package metadata, so it runs before torch, transformers or peft is imported
(an incompatible one may already fail at its own import). Set ``SADI_PEFT_SKIP_VERSION_CHECK=1`` to try an untested
version anyway: the check then only logs a warning.

Tested combinations (Python 3.11, CPU):

* torch 2.13.0 + transformers 5.23.0 + peft 0.21.2: the full test suite (``make test``, ``.venv``);
* torch 2.13.0 + transformers 4.57.6 + peft 0.21.2: the core tests (``make test-compat``, ``.venv-compat``);
* once by hand, the same core tests: transformers 5.0.0 and 5.10.4 with peft 0.21.2; peft 0.21.0 with transformers
  4.57.0 and 5.23.0.
"""

from __future__ import annotations

import importlib
import logging
import os
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

logger = logging.getLogger(__name__)

#: Environment variable that turns a version mismatch from an ImportError into a logged warning.
SKIP_ENV = "SADI_PEFT_SKIP_VERSION_CHECK"

#: Distribution name -> supported range. Must equal the ``[project] dependencies`` entries of pyproject.toml.
SUPPORTED: dict[str, str] = {
    # Only 2.13.0 (CPU) is tested; older releases are not claimed.
    "torch": ">=2.13",
    # 4.57.x: tested with 4.57.6 (make test-compat). 5.24 demands peft>=0.22 (its MIN_PEFT_VERSION) in
    # add_adapter/set_adapter/delete_adapter, and peft 0.22 is not released: 5.23.0 is the newest tested.
    "transformers": ">=4.57,<5.24",
    # 0.21 brought the generic state-dict code (peft PR 3490) that lets an out-of-tree PeftType save and load;
    # 0.22 is not released yet.
    "peft": ">=0.21,<0.22",
}

#: Versions run by the test suite; quoted in the error message.
TESTED: dict[str, tuple[str, ...]] = {
    "torch": ("2.13.0",),
    "transformers": ("4.57.6", "5.23.0"),
    "peft": ("0.21.2",),
}


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``: from its package metadata, else the module's ``__version__``;
    ``None`` when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        pass
    try:  # e.g. a source checkout on sys.path without metadata
        module = importlib.import_module(distribution)
    except ImportError:
        return None
    version = getattr(module, "__version__", None)
    return str(version) if version is not None else None


def _problem(distribution: str, version: str | None, spec: str) -> str | None:
    """Describe why ``version`` of ``distribution`` is not usable, or return None if it is within ``spec``."""
    tested = ", ".join(TESTED.get(distribution, ()))
    fix = f'pip install "{distribution}{spec}"'
    if version is None:
        return f"{distribution} is not installed; sadi-peft needs {distribution}{spec} (tested: {tested}). Fix: {fix}"
    try:
        parsed = Version(version)
    except InvalidVersion:
        return (
            f"{distribution} reports the version {version!r}, which is not a valid version number; sadi-peft needs "
            f"{distribution}{spec} (tested: {tested}). Fix: {fix}"
        )
    # A local label (torch 2.13.0+cpu) is ignored; a pre-release counts as the release it precedes.
    if SpecifierSet(spec).contains(parsed, prereleases=True):
        return None
    return (
        f"{distribution} {version} is installed, but sadi-peft supports {distribution}{spec} "
        f"(tested: {tested}). Fix: {fix}"
    )


def version_problems(versions: dict[str, str | None] | None = None) -> list[str]:
    """One message per supported package whose installed version is missing or outside :data:`SUPPORTED`.

    Args:
        versions: Distribution name -> version to check instead of the installed ones (for tests).
    """
    problems = []
    for distribution, spec in SUPPORTED.items():
        version = versions[distribution] if versions is not None and distribution in versions else (
            installed_version(distribution)
        )
        problem = _problem(distribution, version, spec)
        if problem is not None:
            problems.append(problem)
    return problems


def check_versions(versions: dict[str, str | None] | None = None) -> None:
    """Raise :class:`ImportError` when torch, transformers or peft is missing or outside the supported range.

    With ``SADI_PEFT_SKIP_VERSION_CHECK=1`` in the environment the problems are logged as a warning instead.
    """
    problems = version_problems(versions)
    if not problems:
        return
    if os.environ.get(SKIP_ENV, "").strip().lower() in {"1", "true", "yes"}:
        logger.warning(
            "%s is set: importing sadi-peft with untested versions (%s). Expect failures inside PEFT/transformers.",
            SKIP_ENV, "; ".join(problems),
        )
        return
    raise ImportError(
        "sadi-peft cannot run with the installed packages:\n  - "
        + "\n  - ".join(problems)
        + f"\nInstall the versions named above (or reinstall sadi-peft, which declares them). To import anyway with "
        f"untested versions, set the environment variable {SKIP_ENV}=1."
    )

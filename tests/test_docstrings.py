"""The docstrings: every module's examples run, and every public name has them.

The examples write only to temporary folders (`tempfile.mkdtemp()`); the
feature cache is a temporary folder too (conftest.py sets
`TFTRANSFER_CACHE_DIR`).
"""

import doctest
import importlib
import inspect
import io
import pkgutil

import pytest

import tftransfer

MODULES = sorted(
    f"tftransfer.{info.name}"
    for info in pkgutil.iter_modules(tftransfer.__path__)
    if info.name != "__main__"
)


@pytest.mark.parametrize("module_name", MODULES)
def test_doctests_pass(module_name, tmp_path, monkeypatch):
    # Examples that leave a relative path to the default run folder
    # (`saved_models/...`) resolve it here, not in the repository.
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    report = io.StringIO()
    failed = attempted = 0
    for test in finder.find(module, module_name):
        results = runner.run(test, out=report.write)
        failed += results.failed
        attempted += results.attempted
    assert failed == 0, (
        f"{failed} of {attempted} examples of {module_name} failed:\n"
        f"{report.getvalue()}"
    )


def _public_objects():
    return {name: getattr(tftransfer, name) for name in tftransfer.__all__}


def _missing_sections(function) -> list:
    doc = inspect.getdoc(function) or ""
    wanted = ["Returns:", "Example:"]
    if inspect.signature(function).parameters:
        wanted.insert(0, "Args:")
    return [section for section in wanted if section not in doc]


def test_public_names_are_documented():
    offenders = []
    for name, value in _public_objects().items():
        if inspect.isclass(value):
            if issubclass(value, BaseException):
                continue
            if "Example:" not in (inspect.getdoc(value) or ""):
                offenders.append(f"{name} (class): Example:")
        elif callable(value):
            missing = _missing_sections(value)
            if missing:
                offenders.append(f"{name}: {', '.join(missing)}")
    assert not offenders, "Docstrings lacking sections:\n" + "\n".join(offenders)

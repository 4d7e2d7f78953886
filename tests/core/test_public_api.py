"""The public surface: explicit re-exports, and every public name documented with an example
(the examples themselves run as doctests)."""

import inspect

import jlora
import jlora.hf
import jlora.train


def _documented(obj):
    doc = inspect.getdoc(obj) or ""
    return doc and ">>>" in doc


def test_all_lists_exactly_the_public_names():
    public = {n for n in dir(jlora) if not n.startswith("_")}
    assert set(jlora.__all__) <= public
    for name in jlora.__all__:
        assert getattr(jlora, name) is not None


def test_every_public_core_name_has_a_docstring_with_an_example():
    missing = [n for n in jlora.__all__ if n != "errors" and not _documented(getattr(jlora, n))]
    assert not missing, f"public names without a runnable example: {missing}"


def test_every_public_name_of_subpackages_has_a_docstring():
    for mod in (jlora.hf, jlora.train):
        for name in mod.__all__:
            assert inspect.getdoc(getattr(mod, name)), f"{mod.__name__}.{name} has no docstring"

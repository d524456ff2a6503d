"""Every Lua script is a package file, and each one compiles in a real Redis."""

from __future__ import annotations

from importlib import resources

import pytest

from sinkserve.store import scripts


def test_the_names_are_exactly_the_package_files():
    files = {entry.name for entry in resources.files("sinkserve.store").joinpath("lua").iterdir()}
    assert files == {f"{name}.lua" for name in scripts.NAMES}


@pytest.mark.parametrize("name", scripts.NAMES)
async def test_each_script_loads_from_its_file_and_compiles(store, name):
    text = scripts.source(name)
    assert text == resources.files("sinkserve.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    sha = await store.redis.script_load(text)  # SCRIPT LOAD compiles: a syntax error fails here
    assert (await store.redis.script_exists(sha)) == [True]


def test_an_unknown_script_is_refused():
    with pytest.raises(KeyError):
        scripts.source("nope")

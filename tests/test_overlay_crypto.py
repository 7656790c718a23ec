"""Whether the instances' overlay can be encrypted: the kernel's ESP, read from what a container sees."""

import os

import pytest

from backends.overlay_crypto import encryption_note
from backends.overlay_crypto import esp_in_symbols
from backends.overlay_crypto import kernel_has_esp

WITH_ESP = "ffffffff82108cf0 T xfrm_state_add\nffffffff8210a000 t esp_output\n"
WITHOUT = "ffffffff82108cf0 T xfrm_state_add\nffffffff8210a000 t esp_output_done\n"


def test_esp_is_its_functions_in_the_symbol_table():
    assert esp_in_symbols(WITH_ESP) and not esp_in_symbols(WITHOUT) and not esp_in_symbols("")


def kernel(tmp_path, symbols: str | None, modules: bool, module_tree: list[str] | None):
    proc, lib = tmp_path / "proc", tmp_path / "lib"
    proc.mkdir()
    if symbols is not None:
        (proc / "kallsyms").write_text(symbols)
    if modules:
        (proc / "modules").write_text("")
    if module_tree is not None:
        where = lib / os.uname().release / "kernel" / "net" / "ipv4"
        where.mkdir(parents=True)
        for name in module_tree:
            (where / name).write_text("")
    return kernel_has_esp(proc, lib)


@pytest.mark.parametrize(
    "symbols, modules, module_tree, has",
    [
        (WITH_ESP, True, None, True),  # built in, or loaded
        (WITHOUT, False, None, False),  # no loadable modules: what is built in is all (this test machine)
        (WITHOUT, True, ["esp4.ko.zst"], True),  # a module the kernel loads on the first ESP state
        (WITHOUT, True, ["ah4.ko"], False),
        (WITHOUT, True, None, None),  # modules, but their tree not mounted here: cannot tell
        (None, True, ["esp4.ko"], None),  # no symbol table to read
    ],
)
def test_the_kernel_says_whether_it_has_esp_or_nothing_is_claimed(tmp_path, symbols, modules, module_tree, has):
    assert kernel(tmp_path, symbols, modules, module_tree) is has


@pytest.mark.parametrize(
    "options, esp, says",
    [
        ({"encrypted": ""}, True, "is encrypted"),
        ({}, True, "not encrypted though this kernel has ESP"),
        ({}, False, "lacks ESP (CONFIG_INET_ESP)"),
        ({}, None, "cannot tell"),
    ],
)
def test_the_start_up_line_says_whether_the_overlay_is_encrypted(options, esp, says):
    assert says in encryption_note("datalab-swarm", options, esp)

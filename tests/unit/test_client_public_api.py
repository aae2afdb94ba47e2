"""remoteloss's public names: __all__ complete and sorted; importing needs no torch."""

from __future__ import annotations

import subprocess
import sys
import types

import remoteloss


def test_all_is_sorted_and_complete() -> None:
    assert remoteloss.__all__ == sorted(remoteloss.__all__)
    public = {
        name
        for name, value in vars(remoteloss).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(remoteloss.__all__) == public
    assert all(hasattr(remoteloss, name) for name in remoteloss.__all__)


def test_version() -> None:
    assert remoteloss.__version__ == "0.1.0"


def test_codec_stays_importable() -> None:
    from remoteloss import codec

    assert remoteloss.codec is codec


def test_import_does_not_import_torch() -> None:
    code = "import sys, remoteloss; c = remoteloss.Client('localhost:1'); c.close(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_import_works_without_torch_installed() -> None:
    code = "import sys; sys.modules['torch'] = None; import remoteloss, remoteloss.codec"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_remoteloss_nn_without_torch_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n"
        "    import remoteloss.nn\n"
        "except ImportError as exc:\n"
        "    assert isinstance(exc, ModuleNotFoundError) and exc.name == 'torch', repr(exc)\n"
        "    print(exc)\n"
        "else:\n"
        "    raise AssertionError('remoteloss.nn imported without torch')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True)
    assert "pip install torch" in done.stdout
    assert "remoteloss[torch]" in done.stdout
    assert "value_and_grad" in done.stdout

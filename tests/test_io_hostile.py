"""Hostile inputs at the I/O edges: links, pipes and unlistable folders in a LocalStore, and photos
that carry a second, unmasked copy of themselves (thumbnails, MPF frames, hidden APNG frames)."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from platemask.storage import LocalStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_local_writes_and_deletes_replace_a_link_never_what_it_leads_to(tmp_path):
    """DST holding a.jpg -> b.jpg (a dedupe tool's link) and c.jpg -> ../outside.jpg: writing a.jpg
    overwrote b.jpg through the link, deleting c.jpg's stale copy deleted b.jpg, and a link leading
    out of DST made its key 'escape' (the photo failed). The link itself is replaced or removed."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "b.jpg").write_bytes(b"b's own masked copy")
    (tmp_path / "outside.jpg").write_bytes(b"not in DST")
    os.symlink("b.jpg", dst / "a.jpg")
    os.symlink("b.jpg", dst / "c.jpg")
    os.symlink("../outside.jpg", dst / "d.jpg")
    store = LocalStore(dst)
    store.write("a.jpg", b"a's new masked copy")
    store.delete("c.jpg")
    store.write("d.jpg", b"d's masked copy")
    assert (dst / "b.jpg").read_bytes() == b"b's own masked copy"
    assert (tmp_path / "outside.jpg").read_bytes() == b"not in DST"
    assert not (dst / "a.jpg").is_symlink() and (dst / "a.jpg").read_bytes() == b"a's new masked copy"
    assert not os.path.lexists(dst / "c.jpg")
    assert not (dst / "d.jpg").is_symlink() and (dst / "d.jpg").read_bytes() == b"d's masked copy"
    # a folder link in the middle of a key still may not lead out of DST
    os.symlink(str(tmp_path), dst / "up")
    with pytest.raises(ValueError, match="escapes"):
        store.write("up/x.jpg", b"x")
    with pytest.raises(ValueError):
        store.write("..", b"x")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_local_read_refuses_a_pipe_before_opening_it(tmp_path, monkeypatch):
    """read() opened a named pipe (without waiting) and only then found it is not a file; opening a
    device acts (a watchdog arms). The type is checked first: the pipe is never opened."""
    os.mkfifo(tmp_path / "p.jpg")
    (tmp_path / "f.jpg").write_bytes(b"photo")
    opened: list[str] = []
    real_open = os.open

    def spy(path, flags, *a, **kw):  # calls through: only records what was opened
        opened.append(os.fspath(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    store = LocalStore(tmp_path)
    with pytest.raises(OSError, match="not a regular file"):
        store.read("p.jpg")
    assert store.read("f.jpg") == b"photo"
    assert not any(p.endswith("p.jpg") for p in opened), opened


def test_local_iter_keys_names_the_folders_it_cannot_list(tmp_path):
    """os.walk passed over a folder it cannot list without a word (the CLI walked SRC a second time
    to find them): iter_keys now names them in unreadable_folders, as keys ending in '/'."""
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "a.jpg").write_bytes(b"a")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.jpg").write_bytes(b"b")
    os.chmod(tmp_path / "locked", 0)
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        from platemask.storage import LocalStore
        s = LocalStore({str(tmp_path)!r})
        print(list(s.iter_keys()))
        print([(k, type(e).__name__, e.strerror) for k, e in s.unreadable_folders])
    """)
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # root lists any folder: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to run without root's file-permission override")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert out.returncode == 0, out.stderr
    keys, unreadable = out.stdout.splitlines()
    assert keys == "['open/a.jpg']"
    assert unreadable == "[('locked/', 'PermissionError', 'Permission denied')]"

"""The one atomic JSON writer (predictions, generation configs, corpus manifests, beam and
assisted traces): readers never see half a file, and the file's mode follows the umask."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tracer.jsonio import write_json_atomic


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = write_json_atomic(tmp_path / "p.json", {"输出": "北京 🙂"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert json.loads(path.read_text(encoding="utf-8")) == {"输出": "北京 🙂"}
    assert "北京" in path.read_text(encoding="utf-8")  # non-ASCII kept, not \\u-escaped
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_json_atomic(tmp_path / "p.json", [1])
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert json.loads(path.read_text()) == [1] and len(list(tmp_path.iterdir())) == 1

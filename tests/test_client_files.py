"""asps_client --out-dir: secrets land only in a private directory, in files nobody else owns or reads.

The writing is `asps_client.write_secret_files` (what main() calls after a successful attestation), so
no server is needed here; tests/test_service.py runs --out-dir end to end. Tests that hand files to
another uid need root (os.chown).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import asps_client
from asps_client import EXIT_USAGE, BadReply, OutDirError, write_secret_files

OTHER_UID = 65534  # nobody
SECRET = b"s3cret-value-7f0c9e"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown files to another uid")


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def private_dir(tmp_path: Path, name: str = "out") -> Path:
    d = tmp_path / name
    d.mkdir(mode=0o700)
    d.chmod(0o700)
    return d


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".asps-")]


# --- the directory ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_mode", [0o777, 0o770, 0o1777, 0o702])
def test_group_or_world_writable_directory_is_refused(tmp_path, bad_mode):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(bad_mode)
    with pytest.raises(OutDirError) as info:
        write_secret_files(d, {"master_key": SECRET})
    assert info.value.exit_code == EXIT_USAGE == 2
    assert "writable by group or others" in str(info.value) and str(d) in str(info.value)
    assert list(d.iterdir()) == [], "nothing written into it"
    assert mode(d) == bad_mode, "its mode is not 'fixed' behind the user's back"


def test_cli_refuses_an_unsafe_out_dir_before_attesting(tmp_path, capsys):
    """main() checks --out-dir first: exit 2 with the reason, no connection attempted (port 1)."""
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    ca = tmp_path / "ca.crt"
    ca.write_text("not used: the out-dir check comes first\n")
    argv = ["--host", "127.0.0.1:1", "--ca", str(ca), "--out-dir", str(d), "--connect-timeout", "1"]
    assert asps_client.main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--out-dir" in err and "writable by group or others" in err
    assert list(d.iterdir()) == []


@needs_root
def test_directory_owned_by_another_user_is_refused(tmp_path):
    d = private_dir(tmp_path)
    os.chown(d, OTHER_UID, OTHER_UID)
    with pytest.raises(OutDirError, match=f"owned by uid {OTHER_UID}"):
        write_secret_files(d, {"master_key": SECRET})
    assert list(d.iterdir()) == []


@needs_root
def test_out_dir_symlink_planted_by_another_user_is_refused(tmp_path):
    target = private_dir(tmp_path, "ours")  # private and ours, but the link to it is someone else's
    link = tmp_path / "out"
    link.symlink_to(target)
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(OutDirError, match="symbolic link owned by uid"):
        write_secret_files(link, {"master_key": SECRET})
    assert list(target.iterdir()) == []
    # our own link to our private directory is fine
    os.lchown(link, os.geteuid(), os.getegid())
    write_secret_files(link, {"master_key": SECRET})
    assert (target / "master_key").read_bytes() == SECRET


def test_absent_directory_is_created_0700_and_files_are_0600(tmp_path):
    d = tmp_path / "a" / "b" / "secrets"
    values = {"master_key": SECRET, "secret1": b"\x00\xffbinary\n", "empty": b""}
    write_secret_files(str(d), values)
    assert mode(d) == 0o700
    assert d.stat().st_uid == os.geteuid()
    for name, value in values.items():
        assert (d / name).read_bytes() == value
        assert mode(d / name) == 0o600
        assert (d / name).stat().st_uid == os.geteuid()
    assert leftovers(d) == []


def test_existing_private_directory_is_used_and_files_rewritten(tmp_path):
    d = private_dir(tmp_path)
    d.chmod(0o755)  # readable by others is the user's choice; only writable-by-others is refused
    (d / "master_key").write_bytes(b"old")
    (d / "master_key").chmod(0o644)
    write_secret_files(d, {"master_key": SECRET})
    assert (d / "master_key").read_bytes() == SECRET and mode(d / "master_key") == 0o600
    assert mode(d) == 0o755
    assert leftovers(d) == []


# --- the files --------------------------------------------------------------------------------------


@needs_root
def test_file_planted_by_another_user_is_replaced_not_written_into(tmp_path):
    d = private_dir(tmp_path)
    planted = d / "master_key"
    planted.write_bytes(b"planted by uid 65534")
    os.chown(planted, OTHER_UID, OTHER_UID)
    planted.chmod(0o666)
    old_ino = planted.stat().st_ino
    old_fd = os.open(planted, os.O_RDONLY)  # what the other user would keep reading
    try:
        write_secret_files(d, {"master_key": SECRET})
        assert os.pread(old_fd, 4096, 0) == b"planted by uid 65534", "the old inode was not written to"
        assert os.fstat(old_fd).st_uid == OTHER_UID
    finally:
        os.close(old_fd)
    st = planted.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_ino != old_ino
    assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600
    assert planted.read_bytes() == SECRET


def test_symlink_at_the_target_name_is_replaced_and_its_target_untouched(tmp_path):
    d = private_dir(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim content")
    victim.chmod(0o644)
    (d / "master_key").symlink_to(victim)
    (d / "secret1").symlink_to(tmp_path / "would-be-created")  # dangling
    write_secret_files(d, {"master_key": SECRET, "secret1": b"other"})
    for name, value in (("master_key", SECRET), ("secret1", b"other")):
        st = (d / name).lstat()
        assert stat.S_ISREG(st.st_mode), f"{name} is a plain file now, not a link"
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (d / name).read_bytes() == value
    assert victim.read_bytes() == b"victim content" and mode(victim) == 0o644
    assert not (tmp_path / "would-be-created").exists()


def test_unsafe_names_refuse_everything_before_writing_anything(tmp_path):
    d = private_dir(tmp_path)
    for bad in ("../escape", "a/b", "..", ".", ""):
        with pytest.raises(BadReply, match="not a safe file name"):
            write_secret_files(d, {"master_key": SECRET, bad: b"x"})
        assert list(d.iterdir()) == [], f"nothing written when {bad!r} is among the names"
    assert not (tmp_path / "escape").exists()


def test_failed_write_leaves_no_temp_file_and_no_value_in_the_message(tmp_path):
    d = private_dir(tmp_path)
    (d / "master_key").mkdir()
    (d / "master_key" / "keep").write_text("a directory is in the way")
    with pytest.raises(OutDirError) as info:
        write_secret_files(d, {"master_key": SECRET})
    assert info.value.exit_code == EXIT_USAGE
    assert "master_key" in str(info.value) and SECRET.decode() not in str(info.value)
    assert leftovers(d) == []
    assert (d / "master_key" / "keep").read_text() == "a directory is in the way"


def test_out_dir_that_is_a_file_is_a_local_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutDirError) as info:
        write_secret_files(f, {"master_key": SECRET})
    assert info.value.exit_code == EXIT_USAGE
    assert f.read_text() == "x"

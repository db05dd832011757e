"""The Unix socket's permissions on a real `kafka-sidecar run`: owner and group only (0660) by
default, and given to `listen.unix_socket_group` when set, so an app reaches it by sharing that
group (in Kubernetes, the pod's fsGroup) and other users do not reach it at all."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sidecar.server import Server
from tests.sidecarproc import SidecarProcess, group_subscription

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]

NOBODY = 65534

#: Run as root, then connects as `uid` with only the group `gid`: 0 if it could, 13 if denied.
CONNECT_AS = """\
import os, socket, sys
path, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
try:
    socket.socket(socket.AF_UNIX).connect(path)
except PermissionError:
    sys.exit(13)
"""


def connects_as(path: Path, uid: int, gid: int) -> bool:
    # The interpreter starts as root (it may live under /root) and drops to uid:gid itself.
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CONNECT_AS, str(path), str(uid), str(gid)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode in (0, 13), proc.stderr
    return proc.returncode == 0


def created_group(folder: Path) -> int:
    """The group a new file in `folder` gets: the folder's if it is setgid, else ours."""
    info = folder.stat()
    return info.st_gid if info.st_mode & stat.S_ISGID else os.getegid()


def another_group() -> tuple[int, str | int]:
    """A group this process may give a file to, other than its own where possible, and how to
    write it in the config (a name when the host has one, exercising the lookup)."""
    if os.geteuid() == 0:
        # Root may chown to any group: a named one that is neither ours nor nobody's.
        for entry in grp.getgrall():
            if entry.gr_gid not in (os.getegid(), NOBODY, 0):
                return entry.gr_gid, entry.gr_name
        return 4242, 4242  # no /etc/group entry needed for a gid
    others = [gid for gid in os.getgroups() if gid != os.getegid()]
    gid = others[0] if others else os.getegid()
    return gid, gid


async def test_socket_is_owner_and_group_only_by_default(
    new_topic: TopicFactory, start_sidecar: StartSidecar
) -> None:
    topic = await new_topic()
    sidecar = await start_sidecar([group_subscription("sock", topic)], listener="plaintext")
    info = os.stat(sidecar.socket)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_uid == os.geteuid()
    assert info.st_gid == created_group(sidecar.dir)
    if os.geteuid() == 0:  # switching users needs root
        sidecar.dir.chmod(0o711)  # only the socket's own mode stands between them and it
        assert not connects_as(sidecar.socket, NOBODY, NOBODY), "0660: not for other users"


async def test_socket_is_given_the_configured_group(
    new_topic: TopicFactory, start_sidecar: StartSidecar
) -> None:
    gid, written = another_group()
    topic = await new_topic()
    sidecar = await start_sidecar(
        [group_subscription("grouped", topic)],
        listener="plaintext",
        listen={"unix_socket_group": written},
    )
    info = os.stat(sidecar.socket)
    assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (gid, 0o660)
    if os.geteuid() == 0:
        sidecar.dir.chmod(0o711)
        # An app of another user reaches it through the group alone (as the pod's fsGroup
        # does for the app container); without the group it cannot.
        assert connects_as(sidecar.socket, NOBODY, gid)
        assert not connects_as(sidecar.socket, NOBODY, NOBODY)


async def test_a_group_the_sidecar_cannot_give_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a member of the group (EPERM): the start fails naming the key, and the daemon
    exits 1 as for any listener it cannot open."""

    def not_a_member(path: object, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    socket_path = tmp_path / "s.sock"
    server = Server([f"unix://{socket_path}"], {}, None, unix_socket_group=4242)
    monkeypatch.setattr(os, "chown", not_a_member)
    try:
        with pytest.raises(OSError, match=r"^listen\.unix_socket_group: ") as failed:
            await server.start()
        assert str(failed.value) == (
            f"listen.unix_socket_group: cannot give {socket_path} to group 4242: Operation not"
            " permitted (the sidecar's user must belong to it)"
        )
        # Never left wider than owner-only meanwhile, whatever the umask.
        assert stat.S_IMODE(socket_path.stat().st_mode) & 0o077 == 0
    finally:
        await server.stop(0)

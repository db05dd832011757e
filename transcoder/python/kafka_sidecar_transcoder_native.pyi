# The extension module (src/python.rs), typed for mypy here beside the package that imports
# it: the wheel built from transcoder/ ships the module alone.

from collections.abc import Iterable, Sequence

def transcode(
    data: bytes,
    topic: str,
    partition: int,
    fetch_offset: int,
    aborted: Sequence[tuple[int, int]] | None,
    check_crcs: bool,
    keys: bool = False,
) -> tuple[
    bytes,
    list[int],
    list[int],
    list[int],
    int,
    int,
    tuple[str, str] | None,
    list[bytes | None] | None,
]: ...
def batch_bytes(
    batch_id: int,
    runs: Iterable[tuple[bytes, Sequence[int], int, int, int]],
    *,
    response: bool = False,
) -> bytes: ...

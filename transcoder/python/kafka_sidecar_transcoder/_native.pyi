from collections.abc import Iterable, Sequence

def transcode(
    data: bytes,
    topic: str,
    partition: int,
    fetch_offset: int,
    aborted: Sequence[tuple[int, int]] | None,
    check_crcs: bool,
) -> tuple[bytes, list[int], list[int], list[int], int, int, tuple[str, str] | None]: ...
def batch_bytes(
    batch_id: int, records: Iterable[tuple[bytes, int]], *, response: bool = False
) -> bytes: ...

"""gzip through trtseg.codec: standard streams either way, every level, and clear failures on truncation."""
import gzip

import pytest

from trtseg import codec

DATA = bytes(range(256)) * 4000 + b"\x00" * 100000


@pytest.mark.parametrize("level", [1, 2, 3, 6, 9])
def test_streams_are_standard_gzip(level):
    packed = codec.compress(DATA, level)
    assert gzip.decompress(packed) == DATA
    assert codec.decompress(gzip.compress(DATA, level)) == DATA


def test_truncated_stream_raises_a_known_error():
    packed = codec.compress(DATA, 1)
    with pytest.raises(codec.ERRORS):
        codec.decompress(packed[: len(packed) // 2])


def test_isal_is_used_where_installed():
    import importlib.util
    if importlib.util.find_spec("isal") is None:
        pytest.skip("isal is not installed on this machine")
    assert codec.backend() == "isal"

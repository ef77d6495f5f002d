"""b4m.switch.Switch: off by default, on for a block, restored after it (nested blocks and exceptions too)."""

import pytest

from b4m.switch import Switch


def test_a_switch_is_set_for_its_block_and_restored_after():
    s = Switch("probe")
    assert not s and "off" in repr(s)
    with s():
        assert s
        with s(False):
            assert not s
        assert s
    assert not s
    with pytest.raises(ValueError), s():
        raise ValueError
    assert not s
    assert Switch("probe", default=True)

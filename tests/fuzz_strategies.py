"""``hypothesis`` strategies over the grammar of :mod:`tests.fuzz_models`."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.fuzz_models import BLOCKS, BlockSpec, RandomNet, randomize

block_specs = st.builds(
    BlockSpec,
    kind=st.sampled_from(BLOCKS),
    width=st.integers(2, 12),
    kernel=st.sampled_from((1, 3)),
    groups=st.sampled_from(("none", "grouped", "depthwise")),
    bn=st.booleans(),
    relu=st.booleans(),
    heads=st.sampled_from((1, 2)),
)


@st.composite
def random_nets(draw) -> RandomNet:
    net = RandomNet(draw(st.integers(2, 8)), draw(st.lists(block_specs, min_size=1, max_size=4)), draw(st.booleans()))
    return randomize(net, draw(st.integers(0, 2**16)))

"""The two latency models of cascadenet.models.latency against hand counts (docs: evaluate.py, README)."""

from __future__ import annotations

import pytest

import cascadenet as cn
from cascadenet.models.latency import critical_path
from cascadenet.models.msdnet import MSDNetConfig
from cascadenet.models.sdn import SDNConfig


def _cascade(arch: str, **kw):
    return cn.create_model(arch, width=8, stem="cifar_pool", in_channels=1, **kw)


def test_resnet10_cascade_critical_path_is_the_hand_count():
    # stem 1 conv; block 1 identity shortcut, blocks 2-4 a 1x1 projection beside the 3x3 pair. Step 1 crosses the
    # stem and the skip chain (1 + 0 + 1 + 1 + 1 = 4); each later step adds a delayed branch (2 convs) where it
    # is the longer path: 6, 7, 8, 9 (the settled ResNet: 1 + 4 * 2)
    model = _cascade("resnet10")
    assert critical_path(model, (1, 28, 28), "layers") == [0.0, 4.0, 6.0, 7.0, 8.0, 9.0]
    assert critical_path(model, (1, 28, 28), "blocks") == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    # without the stem delay the input is seen at step 0
    assert critical_path(_cascade("resnet10", stem_delay=False), unit="layers") == [4.0, 6.0, 7.0, 8.0, 9.0]


def test_resnet18_parallel_and_serial_hand_counts():
    # blocks 1, 2 identity; 3, 5, 7 projections; 4, 6, 8 identity. Parallel: step 1 = 1 + 3 projections = 4,
    # then +2 while the delayed branches of the first stage lead, +1 once a projection stage is the bottleneck
    par = _cascade("resnet18")
    assert critical_path(par, unit="layers") == [0.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 15.0, 16.0, 17.0]
    # serial: block k passes its residual from step k + 2 on; a projection block whose branch is not yet on
    # (block 3 at step 3: max(8 + 1, ...) and so on) is crossed by its 1x1 conv alone
    ser = _cascade("resnet18", scheme="serial")
    assert critical_path(ser, unit="layers") == [0.0, 4.0, 6.0, 8.0, 9.0, 11.0, 12.0, 14.0, 15.0, 17.0]
    # the settled value is the feed-forward ResNet's depth in both schemes: stem + 8 blocks of 2 convs
    assert critical_path(par, unit="layers")[-1] == critical_path(ser, unit="layers")[-1] == 1 + 8 * 2


@pytest.mark.parametrize("scheme", ["parallel", "serial"])
@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "resnet50"])
def test_block_units_from_structure_equal_exit_costs(arch, scheme):
    for stem_delay in (True, False):
        model = _cascade(arch, scheme=scheme, stem_delay=stem_delay)
        assert critical_path(model, (1, 28, 28), "blocks") == model.exit_costs((1, 28, 28)).latency


def test_sdn_hand_counts_and_the_stem_ic():
    sdn = SDNConfig(arch="resnet10", width=8, stem="cifar_pool", in_channels=1, input_size=28).build()
    assert sdn.ic_after == (1, 2, 3)
    # stem 1; block 1 + 2 = 3; blocks 2, 3, 4 + 2 each (the projection runs beside the pair): 5, 7, 9
    assert critical_path(sdn, unit="layers") == [3.0, 5.0, 7.0, 9.0]
    assert critical_path(sdn, unit="blocks") == sdn.exit_costs((1, 28, 28)).latency == [2.0, 3.0, 4.0, 5.0]
    stem_ic = SDNConfig(arch="resnet10", width=8, stem="cifar_pool", in_channels=1, input_size=28,
                        ic_after=(0, 1, 2, 3)).build()  # fmt: skip
    assert critical_path(stem_ic, unit="layers") == [1.0, 3.0, 5.0, 7.0, 9.0]
    r18 = SDNConfig(arch="resnet18", width=4, input_size=32).build()
    assert r18.ic_after == (1, 2, 3, 5, 6, 7)
    assert critical_path(r18, unit="layers") == [3.0, 5.0, 7.0, 11.0, 13.0, 15.0, 17.0]


def test_msdnet_hand_count():
    # one block of 2 layers, 2 scales, bottleneck: stem 1 conv (fine), 2 (coarse); a layer's coarse output is the
    # longer of its same-scale (1x1 + 3x3 from 2) and strided (1x1 + 3x3 from the fine scale at 1) convs: 4, then
    # 6 (the fine scale at 3 + 2 = 5 < 4 + 2); the classifier's two convs: 8. Without the bottleneck, 1 conv each.
    cfg = dict(num_blocks=2, base=2, step=1, num_scales=2, gr_factor=(1, 2), bn_factor=(1, 2), reduction=0.0,
               in_channels=1)  # fmt: skip
    model = MSDNetConfig(**cfg).build()
    assert critical_path(model, unit="layers") == [8.0, 10.0]
    assert critical_path(MSDNetConfig(**cfg, bottleneck=False).build(), unit="layers") == [6.0, 7.0]
    assert critical_path(model, unit="blocks") == model.exit_costs((1, 28, 28)).latency == [4.0, 5.0]
    preset = cn.create_model("msdnet-cifar")
    assert critical_path(preset, unit="blocks") == preset.exit_costs((3, 32, 32)).latency


def test_unknown_unit_and_family():
    with pytest.raises(ValueError, match="unknown latency unit 'ms'"):
        critical_path(_cascade("resnet10"), unit="ms")
    assert critical_path(object()) is None

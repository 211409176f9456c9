"""FalconNet layers: SF-Conv, RefCO, RepSO, the Meta blocks and every Table 1 block type."""
from .activation import ACTIVATIONS, DEFAULT_ACTIVATION
from .blocks import (
    BLOCKS,
    HBOBlock,
    ShuffleV1Unit,
    ShuffleV2Unit,
    channel_shuffle,
    dsc_block,
    falcon_block,
    fasternet_block,
    inverted_residual_block,
    make_block,
    repso_block,
    residual_dsc_block,
    sandglass_block,
)
from .conv_bn import ConvBN
from .fold import bn_scale_shift, fold_conv_bn, identity_kernel, pad_kernel
from .meta_block import TABLE2_CONFIGS, MetaBasicBlock, MetaLightBlock, PartialConv, table2_block
from .refco import RefCO
from .repso import TABLE3_COLUMNS, TABLE3_CONFIGS, RepSO, table3_config
from .sf_conv import SFConv2d, check_sf_config, choose_k, sf_conv_params

__all__ = [
    "ACTIVATIONS", "DEFAULT_ACTIVATION", "BLOCKS", "HBOBlock", "ShuffleV1Unit", "ShuffleV2Unit",
    "channel_shuffle", "dsc_block", "falcon_block", "fasternet_block", "inverted_residual_block",
    "make_block", "repso_block", "residual_dsc_block", "sandglass_block", "ConvBN", "bn_scale_shift",
    "fold_conv_bn", "identity_kernel", "pad_kernel", "TABLE2_CONFIGS", "MetaBasicBlock",
    "MetaLightBlock", "PartialConv", "table2_block", "RefCO", "TABLE3_COLUMNS", "TABLE3_CONFIGS",
    "RepSO", "table3_config", "SFConv2d", "check_sf_config", "choose_k", "sf_conv_params",
]

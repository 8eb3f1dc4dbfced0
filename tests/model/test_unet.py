"""The U-Net's coordinate channels (CoordConv): what the base stage sees of where a pixel is."""

import torch

from ediffi.config import UNetConfig
from ediffi.edm import EDMDenoiser
from ediffi.unet import pixel_coordinates


def test_pixel_coordinates_span_the_image_left_to_right_and_top_to_bottom():
    coords = pixel_coordinates(torch.zeros(2, 3, 4, 5))
    assert coords.shape == (2, 2, 4, 5)
    x, y = coords[0]
    assert x[0, 0] == -1 and x[0, -1] == 1 and torch.equal(x[0], x[-1])  # x varies along width only
    assert y[0, 0] == -1 and y[-1, 0] == 1 and torch.equal(y[:, 0], y[:, -1])  # y along height only
    assert torch.equal(coords[0], coords[1])


def _denoiser(coord_channels: bool) -> EDMDenoiser:
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=8, channel_mult=[1, 2], attention_resolutions=[32], num_heads=2, context_dim=8,
                     pooled_dim=4, embedding_dim=16, groups=4, coord_channels=coord_channels)
    net = EDMDenoiser(cfg, 64)
    torch.nn.init.normal_(net.net.out_conv.weight, std=0.1)
    return net


def _call(net: EDMDenoiser, x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    return net(x, torch.full((b,), 1.0), torch.zeros(b, 3, 8), torch.ones(b, 3, dtype=torch.bool), torch.zeros(b, 4),
               torch.zeros(b, 3, 64, 64), torch.zeros(b))


def test_coordinate_channels_let_the_network_tell_positions_apart():
    """A uniform input gives the same output at every interior pixel without
    coordinates (convolutions and self-attention are translation-equivariant
    beyond the border's reach); with coordinates the interior pixels differ."""
    x = torch.full((1, 3, 64, 64), 0.3)
    with torch.no_grad():
        plain = _call(_denoiser(False), x)[0, :, 30:34, 30:34]
        coord = _call(_denoiser(True), x)[0, :, 30:34, 30:34]
    assert _denoiser(True).net.input_conv.in_channels == 5
    assert torch.allclose(plain, plain[:, :1, :1].expand_as(plain), atol=1e-6)
    assert (coord - coord[:, :1, :1]).abs().amax() > 1e-3

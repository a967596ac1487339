"""ConvNeXt dense backbone (models.md) registered with mmdet's BACKBONES as `ConvNeXtRef`.

Official structure and parameter names (`downsample_layers`, `stages`, `norm{i}`); the
channels-first LayerNorm is computed by moving channels last and calling F.layer_norm (the
same numbers as the official hand-written mean/var form, to float rounding).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, dim, layer_scale_init_value=1.0, drop_path=0.0):
        super().__init__()
        self.drop_path = drop_path
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None

    def forward(self, x):
        inp = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0:
            # Stochastic depth per sample (timm's DropPath, as the official backbone).
            keep = 1.0 - self.drop_path
            x = x * x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep).div_(keep)
        return inp + x


class ConvNeXtRef(nn.Module):
    def __init__(self, in_chans=3, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), layer_scale_init_value=1.0,
                 out_indices=(0, 1, 2, 3), drop_path_rate=0.0, init_cfg=None, **kw):
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6)))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        first = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(
            nn.Sequential(*[Block(dims[i], layer_scale_init_value, rates[first[i] + j]) for j in range(depths[i])])
            for i in range(4))
        self.out_indices = out_indices
        for i in out_indices:
            self.add_module(f"norm{i}", LayerNorm2d(dims[i], eps=1e-6))

    def init_weights(self):
        pass

    def forward(self, x):
        outs = []
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x))
        return tuple(outs)


def register():
    from mmdet.models.builder import BACKBONES
    if "ConvNeXtRef" not in BACKBONES.module_dict:
        BACKBONES.register_module(module=ConvNeXtRef)

"""Model definitions written here (no torchvision): benchmarks, tests and users' examples.

`resnet18` and `mobilenet_v2` follow the published architectures so that benchmark figures
compare with the ones in ../shared/FACTS.md. The others are small versions of the architecture
families whose graphs make structured pruning hard (residual adds, concatenation, depthwise and
grouped convs, squeeze-and-excitation, channel shuffle, attention); `ZOO` lists them all with a
`width` argument so tests can build tiny instances.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin, cout, k=3, s=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = conv_bn(cin, cout, 1, stride, act=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return self.relu(self.conv2(self.conv1(x)) + idt)


class ResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes=1000,
                 in_ch=3, small_input=False):
        super().__init__()
        if small_input:  # CIFAR-style stem for 32x32 inputs
            self.stem = conv_bn(in_ch, widths[0], 3, 1)
        else:
            self.stem = nn.Sequential(conv_bn(in_ch, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(num_classes=1000, in_ch=3, small_input=False, width=1.0):
    widths = tuple(max(8, int(w * width)) for w in (64, 128, 256, 512))
    return ResNet((2, 2, 2, 2), widths, num_classes, in_ch, small_input)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, act=nn.ReLU6)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   conv_bn(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2(nn.Module):
    # (expand, channels, repeats, stride) from the MobileNetV2 paper
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=1000, in_ch=3, width=1.0, small_input=False):
        super().__init__()
        c = lambda n: max(8, int(n * width + 4) // 8 * 8)  # noqa: E731 - channel rounding
        cin = c(32)
        layers = [conv_bn(in_ch, cin, 3, 1 if small_input else 2, act=nn.ReLU6)]
        for t, ch, n, s in self.SETTINGS:
            if small_input and s == 2 and ch in (24,):
                s = 1
            for i in range(n):
                layers.append(InvertedResidual(cin, c(ch), s if i == 0 else 1, t))
                cin = c(ch)
        last = max(1280, c(1280)) if width > 1.0 else 1280
        layers.append(conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2(num_classes=1000, in_ch=3, width=1.0, small_input=False):
    return MobileNetV2(num_classes, in_ch, width, small_input)


# --- Plain conv stack (VGG-style): the easy case, every conv is its own pruning group.

class ConvNet(nn.Module):
    def __init__(self, num_classes=10, in_ch=3, widths=(32, 64, 128)):
        super().__init__()
        layers, cin = [], in_ch
        for w in widths:
            layers += [conv_bn(cin, w), conv_bn(w, w), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def convnet(num_classes=10, in_ch=3, width=1.0):
    return ConvNet(num_classes, in_ch, tuple(max(8, int(w * width)) for w in (32, 64, 128)))


# --- DenseNet: every layer's output is concatenated to its input, so one conv's filters are
# slices of many later convs' input channels.

class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                  nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True),
                                  nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, num_classes=10, in_ch=3, growth=12, blocks=(4, 4, 4)):
        super().__init__()
        cin = 2 * growth
        layers = [nn.Conv2d(in_ch, cin, 3, padding=1, bias=False)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(cin, growth))
                cin += growth
            if i < len(blocks) - 1:  # transition: halve channels and resolution
                layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                           nn.Conv2d(cin, cin // 2, 1, bias=False), nn.AvgPool2d(2)]
                cin //= 2
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def densenet(num_classes=10, in_ch=3, width=1.0):
    return DenseNet(num_classes, in_ch, growth=max(4, int(12 * width)))


# --- Inception-style block: parallel branches concatenated (GoogLeNet).

class InceptionBlock(nn.Module):
    def __init__(self, cin, b1, b3, b5, bp):
        super().__init__()
        self.b1 = conv_bn(cin, b1, 1)
        self.b3 = nn.Sequential(conv_bn(cin, b3, 1), conv_bn(b3, b3, 3))
        self.b5 = nn.Sequential(conv_bn(cin, b5, 1), conv_bn(b5, b5, 3), conv_bn(b5, b5, 3))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, bp, 1))
        self.out_channels = b1 + b3 + b5 + bp

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class InceptionNet(nn.Module):
    def __init__(self, num_classes=10, in_ch=3, w=16):
        super().__init__()
        self.stem = conv_bn(in_ch, 2 * w, 3)
        self.inc1 = InceptionBlock(2 * w, w, 2 * w, w // 2, w // 2)
        self.down = nn.MaxPool2d(2)
        self.inc2 = InceptionBlock(self.inc1.out_channels, 2 * w, 3 * w, w, w)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inc2.out_channels, num_classes)

    def forward(self, x):
        x = self.inc2(self.down(self.inc1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def inception(num_classes=10, in_ch=3, width=1.0):
    return InceptionNet(num_classes, in_ch, max(4, int(16 * width)) // 2 * 2)


# --- MobileNetV3-style: depthwise convs, hard-swish and squeeze-and-excitation, whose
# channel-wise gate multiplies the block's features (an elementwise dependency).

class SqueezeExcite(nn.Module):
    def __init__(self, ch, reduction=4):
        super().__init__()
        hidden = max(8, ch // reduction)
        self.fc1 = nn.Conv2d(ch, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, ch, 1)

    def forward(self, x):
        s = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


class V3Block(nn.Module):
    def __init__(self, cin, hidden, cout, k, stride, se, act):
        super().__init__()
        layers = [] if hidden == cin else [conv_bn(cin, hidden, 1, act=act)]
        layers.append(conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV3(nn.Module):
    # (kernel, expanded, out, SE, activation, stride): MobileNetV3-Small's first blocks
    SETTINGS = [(3, 16, 16, True, nn.ReLU, 2), (3, 72, 24, False, nn.ReLU, 2),
                (3, 88, 24, False, nn.ReLU, 1), (5, 96, 40, True, nn.Hardswish, 2),
                (5, 240, 40, True, nn.Hardswish, 1), (5, 120, 48, True, nn.Hardswish, 1)]

    def __init__(self, num_classes=10, in_ch=3, width=1.0):
        super().__init__()
        c = lambda n: max(8, int(n * width + 4) // 8 * 8)  # noqa: E731 - channel rounding
        cin = c(16)
        layers = [conv_bn(in_ch, cin, 3, 1, act=nn.Hardswish)]
        for k, exp, out, se, act, s in self.SETTINGS:
            layers.append(V3Block(cin, c(exp), c(out), k, s, se, act))
            cin = c(out)
        layers.append(conv_bn(cin, c(288), 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(c(288), c(256)), nn.Hardswish(inplace=True),
                                        nn.Linear(c(256), num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v3(num_classes=10, in_ch=3, width=1.0):
    return MobileNetV3(num_classes, in_ch, width)


# --- ShuffleNetV2: channel split, concatenation and channel shuffle (reshape/transpose).

class ChannelShuffle(nn.Module):
    """Interleave channel groups. Written as a gather with a fixed permutation (exports to ONNX
    Gather) and kept a module so that pruning can recognise it: channels feeding a shuffle are
    kept, since removing one would change which channels the permutation pairs up."""

    def __init__(self, groups=2):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        c = x.shape[1]
        perm = torch.arange(c, device=x.device).reshape(self.groups, c // self.groups).t().reshape(-1)
        return x[:, perm]


class ShuffleBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                                         conv_bn(cin, half, 1))
        src = cin if stride > 1 else half
        self.branch2 = nn.Sequential(conv_bn(src, half, 1),
                                     conv_bn(half, half, 3, stride, groups=half, act=None),
                                     conv_bn(half, half, 1))
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.branch2(b)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return self.shuffle(out)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes=10, in_ch=3, widths=(24, 48, 96, 192), repeats=(2, 3, 2)):
        super().__init__()
        self.stem = conv_bn(in_ch, widths[0], 3)
        layers, cin = [], widths[0]
        for w, n in zip(widths[1:], repeats):
            for i in range(n):
                layers.append(ShuffleBlock(cin, w, 2 if i == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.head = conv_bn(cin, 4 * widths[0] * 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * widths[0] * 2, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.head(self.stages(self.stem(x)))), 1))


def shufflenet_v2(num_classes=10, in_ch=3, width=1.0):
    return ShuffleNetV2(num_classes, in_ch, tuple(max(8, int(w * width)) // 4 * 4 for w in (24, 48, 96, 192)))


# --- ViT-style: patch embedding, pre-norm transformer blocks (multi-head attention + MLP).
# Attention keeps `num_heads` as an attribute and derives the head size from `qkv`, the
# convention (timm's) that lets structured pruning remove whole heads.

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        head_dim = self.qkv.out_features // (3 * self.num_heads)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * head_dim ** -0.5
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, self.num_heads * head_dim)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, num_classes=10, in_ch=3, img_size=32, patch=4, dim=64, depth=4, num_heads=4):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(x)).mean(1))


def vit(num_classes=10, in_ch=3, width=1.0, img_size=32):
    heads = 4
    dim = max(heads * 4, int(64 * width) // heads * heads)
    return ViT(num_classes, in_ch, img_size, 4, dim, 4, heads)


def _resnet18_small(num_classes=10, in_ch=3, width=1.0):
    return resnet18(num_classes, in_ch, small_input=True, width=width)


def _mobilenet_v2_small(num_classes=10, in_ch=3, width=1.0):
    return mobilenet_v2(num_classes, in_ch, width, small_input=True)


# Every architecture family, as factories `f(num_classes, in_ch, width)` for 32x32 inputs.
ZOO = {
    "convnet": convnet,
    "resnet18": _resnet18_small,
    "densenet": densenet,
    "inception": inception,
    "mobilenet_v2": _mobilenet_v2_small,
    "mobilenet_v3": mobilenet_v3,
    "shufflenet_v2": shufflenet_v2,
    "vit": vit,
}

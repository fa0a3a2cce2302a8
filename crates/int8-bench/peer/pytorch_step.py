"""PyTorch's FP32 training step for the same models, batch, threads and SGD step as `int8-bench step`.

`cargo xtask bench step --peer pytorch` makes a virtual environment with torch from PyPI, runs this
script after our own measurements, and adds its figures as a column, so that the comparison with the
framework users know is measured on the same machine in the same run.

The models are built the way the zoo builds them (`zoo/src/resnet_cifar.rs`,
`zoo/src/mobilenetv2.rs`), and the script refuses to run if a parameter count differs from ours.
Prints one JSON object: forward, backward and update milliseconds (means over the timed steps).
"""

import argparse
import json
import time

import torch
from torch import nn

# Our zoo's parameter counts for 10 classes (`cargo xtask zoo`).
PARAMS = {"resnet20": 272_474, "mobilenetv2-cifar": 2_236_682}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; a 1x1 convolution with batch norm as the shortcut
    where the shape changes (option B)."""

    def __init__(self, inp, out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = None
        if stride != 1 or inp != out:
            self.shortcut = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        s = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(h + s)


class ResNetCifar(nn.Module):
    """He et al. (2016), Sec. 4.2: depth 6n + 2 (ResNet-20: n = 3)."""

    def __init__(self, n=3, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, inp = [], 16
        for out, stride in [(16, 1), (32, 2), (64, 2)]:
            for i in range(n):
                layers.append(BasicBlock(inp, out, stride if i == 0 else 1))
                inp = out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.layers(h)
        return self.fc(h.mean((2, 3)))


def conv_bn(inp, out, k, stride, groups, relu6):
    layers = [nn.Conv2d(inp, out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(out)]
    if relu6:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inp, out, stride, t):
        super().__init__()
        hidden = inp * t
        layers = [] if t == 1 else [conv_bn(inp, hidden, 1, 1, 1, True)]
        layers += [conv_bn(hidden, hidden, 3, stride, hidden, True), conv_bn(hidden, out, 1, 1, 1, False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x):
        h = self.body(x)
        return h + x if self.residual else h


class MobileNetV2Cifar(nn.Module):
    """Sandler et al. (2018) as torchvision builds it, with the stem and the second stage at stride
    1 for 32x32 inputs, and no dropout before the classifier (as our zoo)."""

    def __init__(self, classes=10):
        super().__init__()
        cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
        layers, inp = [conv_bn(3, 32, 3, 1, 1, True)], 32
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(conv_bn(inp, 1280, 1, 1, 1, True))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, choices=sorted(PARAMS))
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = ResNetCifar() if a.model == "resnet20" else MobileNetV2Cifar()
    params = sum(p.numel() for p in model.parameters())
    if params != PARAMS[a.model]:
        raise SystemExit(f"{a.model}: {params} parameters, our zoo's has {PARAMS[a.model]}; the models differ")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(a.batch, 3, 32, 32)
    labels = torch.arange(a.batch) % 10
    loss_fn = nn.CrossEntropyLoss()

    def step():
        t0 = time.perf_counter()
        loss = loss_fn(model(x), labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    step()  # warm-up, as ours
    n, total, start = 0, [0.0, 0.0, 0.0], time.perf_counter()
    while n < 3 or time.perf_counter() - start < a.seconds:
        for i, d in enumerate(step()):
            total[i] += d
        n += 1
    fwd, bwd, upd = (1e3 * t / n for t in total)
    print(json.dumps({"forward_ms": fwd, "backward_ms": bwd, "update_ms": upd, "steps": n, "torch": torch.__version__}))


if __name__ == "__main__":
    main()

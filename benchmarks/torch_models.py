"""Products against gradients on models people use, random init, CPU: ResNet-18 and ResNet-50
(the torchvision layout, built here: torchvision does not import on the project's machines)
and a GPT-2-style transformer of about 27 M parameters (``transformers``' GPT2LMHeadModel).

For each model: one gradient (``torch.autograd.grad`` of the same loss), and one
Hessian-vector product per engine as a ratio to it, plus the cost per column of a 4-column
``matmat`` of the default engine. Each round times every candidate in turn; medians of the
per-round ratios over ``--repeats`` rounds (so a changing machine load cancels out).
``auto`` is the cached graph here (one batch that fits in memory).

Run: ``python benchmarks/torch_models.py --threads 1 --repeats 3`` (a few minutes; prints a
Markdown table). ``--models resnet18`` for one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from specops.backends import torch as st


# --- ResNets in the torchvision layout ---------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        out = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        cin, stages = 64, []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18():
    return ResNet(BasicBlock, (2, 2, 2, 2))


def resnet50():
    return ResNet(Bottleneck, (3, 4, 6, 3))


def gpt2_27m():
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=8192, n_positions=128, n_embd=512, n_layer=6, n_head=8)
    return transformers.GPT2LMHeadModel(cfg)


def causal_lm(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def setting(name, images, size, tokens):
    torch.manual_seed(0)
    if name == "gpt2":
        ids = torch.randint(0, 8192, (tokens // 128, 128))
        return gpt2_27m().eval(), causal_lm, {"input_ids": ids, "labels": ids}
    model = (resnet18 if name == "resnet18" else resnet50)().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    return model, nn.CrossEntropyLoss(), (torch.randn(images, 3, size, size), torch.randint(0, 1000, (images,)))


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "gpt2"])
    ap.add_argument("--threads", type=int, default=1,
                    help="1 on a shared machine: 2 threads on 2 loaded cores made a gradient 7x slower")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=112, help="image side (224 for ImageNet)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per batch (sequences of 128)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} rounds; images "
          f"{args.images} x 3 x {args.size}^2, GPT-2 {args.tokens} tokens\n")
    print("| model | parameters | gradient (s) | product / gradient: auto | double_backward | "
          "forward_over_reverse | auto, per column of matmat(4) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models:
        model, loss_fn, batch = setting(name, args.images, args.size, args.tokens)
        ops = {engine: st.hessian(model, loss_fn, batch, engine=engine, check_deterministic=False,
                                  cross_check=False)
               for engine in ("auto", "double_backward", "forward_over_reverse")}
        adapter = ops["auto"].adapter
        n = ops["auto"].shape[0]
        v = torch.randn(n)
        V = torch.randn(n, 4)
        ops["auto"] @ v  # builds and caches the graph (the first pass)
        ratios = {k: [] for k in ("auto", "double_backward", "forward_over_reverse", "matmat")}
        grads = []
        for _ in range(args.repeats):
            g = timed(lambda: adapter.gradient(batch))
            grads.append(g)
            for engine, H in ops.items():
                ratios[engine].append(timed(lambda: H @ v) / g)
            ratios["matmat"].append(timed(lambda: ops["auto"] @ V) / 4 / g)
        med = {k: statistics.median(r) for k, r in ratios.items()}
        print(f"| {name} | {n / 1e6:.1f} M | {statistics.median(grads):.2f} | {med['auto']:.2f} | "
              f"{med['double_backward']:.2f} | {med['forward_over_reverse']:.2f} | {med['matmat']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

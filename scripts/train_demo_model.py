"""Train the bundled demo model: normswap.demo.DigitsResNet on scikit-learn's digits, saved as safetensors.

Deterministic (fixed seeds, one CPU thread) and quick (well under a minute on one core). The result goes to
``normswap/assets/digits_resnet.safetensors`` (written by ``normswap.checkpoint.save``, so it records its architecture
and ``normswap.load`` rebuilds it), which ``normswap.demo.load_demo_model`` reads.

Usage::

    python scripts/train_demo_model.py            # train, print test accuracy, write the checkpoint
    python scripts/train_demo_model.py --dry-run  # train and print, write nothing
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from normswap.arch import ArchSpec
from normswap.checkpoint import save
from normswap.demo import ARCH, CHECKPOINT, DigitsResNet, accuracy, digits_data

EPOCHS = 30
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
SEED = 0


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Move each image by up to one pixel in each direction (zero padding), a light augmentation."""
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + 8, dx:dx + 8]


def train() -> DigitsResNet:
    """The demo model, trained from a fixed seed on the demo split's training images."""
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    data = digits_data()
    model = ArchSpec.parse(ARCH).build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(data.train_labels) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=EPOCHS * steps_per_epoch)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(data.train_labels), generator=generator)
        for batch in order.split(BATCH_SIZE):
            images = random_shift(data.train_images[batch], generator)
            loss = F.cross_entropy(model(images), data.train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="train and report, but write no file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    model = train()
    data = digits_data()
    print(f"trained in {time.perf_counter() - start:.1f} s (1 thread)")
    print(f"train accuracy {accuracy(model, data.train_images, data.train_labels):.2%}, "
          f"test accuracy {accuracy(model, data.test_images, data.test_labels):.2%}")
    if not args.dry_run:
        save(model, CHECKPOINT, overwrite=True)
        print(f"wrote {CHECKPOINT} ({CHECKPOINT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

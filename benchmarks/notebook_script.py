"""The notebook's way, as a whole process: `make bench` times it against `python -m pipeline train`.

torchvision's FashionMNIST Dataset with per-image ToTensor + Normalize, a shuffling DataLoader,
`.item()` after every step, then the test accuracy: the same MLP, optimizer and epochs as the
project command it is compared with. bench_train.py also times `notebook_epoch` alone.
Usage: notebook_script.py EPOCHS BATCH_SIZE
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


def notebook_epoch(model, optimizer, loader) -> tuple[float, float, int]:
    """One epoch as the notebook trains it: (mean loss, accuracy, images seen)."""
    model.train()
    running_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        optimizer.zero_grad()
        output = model(images)
        loss = F.nll_loss(output, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item() * len(labels)
        correct += (output.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
    return running_loss / seen, correct / seen, seen


def main(epochs: int, batch_size: int) -> None:
    from torchvision import transforms
    from torchvision.datasets import FashionMNIST

    from pipeline.data.dataset import verified_torchvision_root
    from pipeline.training.models import MLP

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with verified_torchvision_root() as (root, _source, _digests):
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
        train_set = FashionMNIST(root, train=True, transform=transform)
        test_set = FashionMNIST(root, train=False, transform=transform)
    train_set, _validation = torch.utils.data.random_split(train_set, [50_000, 10_000])
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    torch.manual_seed(0)
    model = MLP(dropout=0.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        loss, accuracy, _ = notebook_epoch(model, optimizer, loader)
        print(f"epoch {epoch + 1}: loss {loss:.4f}, accuracy {accuracy:.2%}", flush=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in DataLoader(test_set, batch_size=1000):
            correct += (model(images).argmax(dim=1) == labels).sum().item()
    print(f"test accuracy {correct / len(test_set):.2%}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))

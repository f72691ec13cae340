"""A tiny but real training job: a two-layer network learns the two-moons problem with plain SGD.

Pure Python (no NumPy, no GPU) so it runs on any instance image that has python3. It logs progress every epoch,
writes a checkpoint (the weights) and a metrics file, and exits non-zero if it failed to learn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time


def two_moons(n: int, noise: float, rng: random.Random) -> list[tuple[float, float, int]]:
    points = []
    for i in range(n):
        t = math.pi * rng.random()
        if i % 2 == 0:
            x, y, label = math.cos(t), math.sin(t), 0
        else:
            x, y, label = 1 - math.cos(t), 0.5 - math.sin(t), 1
        points.append((x + rng.gauss(0, noise), y + rng.gauss(0, noise), label))
    return points


class Net:
    """2 inputs → `hidden` tanh units → 1 sigmoid output."""

    def __init__(self, hidden: int, rng: random.Random) -> None:
        self.w1 = [[rng.gauss(0, 1.0) for _ in range(2)] for _ in range(hidden)]
        self.b1 = [0.0] * hidden
        self.w2 = [rng.gauss(0, 1.0 / math.sqrt(hidden)) for _ in range(hidden)]
        self.b2 = 0.0

    def forward(self, x: float, y: float) -> tuple[list[float], float]:
        h = [math.tanh(w[0] * x + w[1] * y + b) for w, b in zip(self.w1, self.b1, strict=True)]
        z = sum(w * v for w, v in zip(self.w2, h, strict=True)) + self.b2
        return h, 1 / (1 + math.exp(-max(-30.0, min(30.0, z))))

    def step(self, x: float, y: float, label: int, lr: float) -> float:
        h, p = self.forward(x, y)
        loss = -(label * math.log(p + 1e-12) + (1 - label) * math.log(1 - p + 1e-12))
        dz = p - label
        for j, hj in enumerate(h):
            dh = dz * self.w2[j] * (1 - hj * hj)
            self.w2[j] -= lr * dz * hj
            self.w1[j][0] -= lr * dh * x
            self.w1[j][1] -= lr * dh * y
            self.b1[j] -= lr * dh
        self.b2 -= lr * dz
        return loss

    def accuracy(self, data: list[tuple[float, float, int]]) -> float:
        return sum((self.forward(x, y)[1] >= 0.5) == bool(label) for x, y, label in data) / len(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", default="out")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pause", type=float, default=0.1, help="seconds to rest after each epoch (watchable logs)")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    train, test = two_moons(600, 0.12, rng), two_moons(200, 0.12, rng)
    net = Net(args.hidden, rng)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    history = []
    for epoch in range(1, args.epochs + 1):
        rng.shuffle(train)
        loss = sum(net.step(x, y, label, args.lr) for x, y, label in train) / len(train)
        acc = net.accuracy(test)
        history.append({"epoch": epoch, "loss": round(loss, 5), "test_accuracy": round(acc, 4)})
        print(f"epoch {epoch:3d}/{args.epochs}  loss {loss:.4f}  test accuracy {acc:.3f}", flush=True)
        time.sleep(args.pause)
    checkpoint = {"hidden": args.hidden, "w1": net.w1, "b1": net.b1, "w2": net.w2, "b2": net.b2}
    with open(os.path.join(args.out, "checkpoint.json"), "w") as f:
        json.dump(checkpoint, f)
    metrics = {
        "final_loss": history[-1]["loss"],
        "test_accuracy": history[-1]["test_accuracy"],
        "epochs": args.epochs,
        "seconds": round(time.time() - started, 2),
        "history": history,
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"saved {args.out}/checkpoint.json and {args.out}/metrics.json", flush=True)
    return 0 if metrics["test_accuracy"] >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())

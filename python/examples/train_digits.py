"""Trains the bundled digits MLP from Python: the run of

    cargo run --release -- train examples/mlp-digits.cir --data examples/data/digits.safetensors --steps 300

(SGD, the examples in file order, the last tenth held out), with the same losses and held-out
accuracy. Run from anywhere after `pip install target/wheels/cleave-*.whl`:

    python python/examples/train_digits.py
"""

import pathlib

import cleave

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 300

data = cleave.read_tensors(ROOT / "examples/data/digits.safetensors")
plan = cleave.compile(ROOT / "examples/mlp-digits.cir")
print(plan)

# `cleave train` holds out a tenth of the examples (at least one batch) for evaluation.
n = len(data["labels"])
held = max(n // 10, plan.batch) if n >= 2 * plan.batch else 0
train = {k: v[: n - held] for k, v in data.items()}
test = {k: v[n - held :] for k, v in data.items()}

losses = plan.train(train, steps=STEPS)
accuracy, eval_loss = plan.evaluate(test)
print(
    f"trained {len(losses)} step(s), final loss {losses[-1]:.4f}, "
    f"held-out accuracy {accuracy:.2%} (loss {eval_loss:.4f})"
)

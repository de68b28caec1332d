#!/usr/bin/env python3
"""Load a directory candle-moe saved (save_pretrained, a training checkpoint, or the finetune
example's output) with transformers and report what it loaded and its perplexity on text.

    /path/to/venv/bin/python scripts/transformers_check.py runs/finetune [--text FILE] [--windows 64]

Prints transformers' loading info (missing / unexpected / mismatched keys) and the mean
next-token perplexity over up to --windows non-overlapping windows of --seq-len tokens of the
text (default: the held-out test books of the shipped Bible corpus, English side), tokenized with
the directory's tokenizer.json. Needs torch, transformers and tokenizers (not used by the tests).
"""
import argparse
import csv
import gzip
import io
import math
import os

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_BOOKS = {"Ruth", "Jonah", "Philemon", "Jude", "III John", "Titus"}


def bible_test_text():
    with gzip.open(os.path.join(ROOT, "data", "bible_en_es.tsv.gz"), "rt", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    head = rows[0]
    b, en = head.index("book"), head.index("en")
    return "\n".join(r[en] for r in rows[1:] if r[b] in TEST_BOOKS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--text")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=64)
    a = ap.parse_args()
    model, info = AutoModelForCausalLM.from_pretrained(a.dir, output_loading_info=True, dtype=torch.float32)
    model.eval()
    print("model_type:", model.config.model_type)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        print(f"{k}: {len(info.get(k, []))}")
    text = open(a.text, encoding="utf-8").read() if a.text else bible_test_text()
    tok = Tokenizer.from_file(os.path.join(a.dir, "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    t = a.seq_len
    n = min(a.windows, (len(ids) - 1) // t)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            x = torch.tensor([ids[w * t:(w + 1) * t]])
            y = torch.tensor(ids[w * t + 1:(w + 1) * t + 1])
            logits = model(x).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            count += t
    print(f"perplexity over {count} tokens ({n} windows of {t}): {math.exp(nll / count):.2f}")


if __name__ == "__main__":
    main()

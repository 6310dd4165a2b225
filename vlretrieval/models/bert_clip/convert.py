"""The BERT tower of a BertCLIP model as a plain paddlenlp BERT, like the seed's ``save_bert_checkpoint.py``.

``python -m vlretrieval.models.bert_clip --model DIR --out DIR`` writes it from a saved model directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ...io import atomic_directory
from .family import FAMILY
from .modeling import BertCLIPModel


def save_text_tower(model: BertCLIPModel, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Write the BERT tower and its tokenizer so ``BertModel`` / ``BertTokenizer.from_pretrained`` load them.

    The text projection is not part of a plain ``BertModel`` and is left out (as in the seed's
    ``save_bert_checkpoint.py``); the directory is a BERT encoder for any downstream task.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.text_model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlretrieval.models.bert_clip --model DIR --out DIR``: the BERT tower as a plain BERT."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlretrieval.models.bert_clip", description=main.__doc__)
    parser.add_argument("--model", required=True, help="a saved BertCLIP directory, e.g. work/<dataset>/bert_clip/models/finetuned")
    parser.add_argument("--out", type=Path, required=True, help="directory for the BertModel and its tokenizer")
    args = parser.parse_args(argv)
    model = FAMILY.load_model(args.model)
    with atomic_directory(args.out) as tmp:
        save_text_tower(model, FAMILY.load_tokenizer(args.model), tmp)
    print(f"BERT text tower of {args.model} written to {args.out}")
    return 0

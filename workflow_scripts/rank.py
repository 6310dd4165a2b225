"""Exact top-k predictions in both directions from image and text features.

Accepts feature directories written by the extraction rule or the reference
``*.img_feat.jsonl`` / ``*.txt_feat.jsonl`` files, and writes the reference prediction jsonl, so it
can stand in for the reference top-k scripts:

    python workflow_scripts/rank.py --image-feats valid_imgs.img_feat.jsonl \\
        --text-feats valid_texts.txt_feat.jsonl --out-t2i valid_predictions.jsonl \\
        --out-i2t valid_tr_predictions.jsonl --top-k 10
"""

from vlretrieval.cli import run
from vlretrieval.retrieval.topk import main

if __name__ == "__main__":
    raise SystemExit(run(main))

"""Rank an evaluation split with a cross encoder: every pair (exhaustive) or a dual encoder's top k
re-ranked (two_stage); writes the same prediction files as dense ranking."""

from vlretrieval.cli import run
from vlretrieval.retrieval.rerank import main

if __name__ == "__main__":
    raise SystemExit(run(main))

"""``python -m vlretrieval.models.bridgetower``: the family's converter command line."""

from ...cli import run
from .convert import main

raise SystemExit(run(main))

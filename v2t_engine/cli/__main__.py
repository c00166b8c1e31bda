"""`python -m v2t_engine.cli ...`: what `torchrun -m v2t_engine.cli train ...` runs."""
from . import main

main()

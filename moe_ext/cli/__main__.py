"""`python -m moe_ext.cli` (for torchrun: `torchrun ... -m moe_ext.cli train-pmol ...`)."""
import sys

from . import main

sys.exit(main())

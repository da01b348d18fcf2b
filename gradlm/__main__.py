"""`python -m gradlm ...` (also what torchrun runs: `torchrun --nproc_per_node 2 -m gradlm train ...`)."""

import sys

from gradlm.cli import main

sys.exit(main())

"""CI regression gate: `dvc metrics diff` of metrics/eval.json against HEAD; exit 1 when a gated
metric (params.yaml `gate`) fell beyond the tolerance. See `drywall_qa.gate`."""

import sys

from drywall_qa.gate import main

if __name__ == "__main__":
    sys.exit(main())

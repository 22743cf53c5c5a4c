"""``python -m erf_monitor.cli``: the ``erf-monitor`` command line (also what
``torchrun --nproc_per_node N -m erf_monitor.cli analyze ...`` runs on every process)."""

import sys

from erf_monitor.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

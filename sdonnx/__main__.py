"""`python -m sdonnx`: the same command as `sdonnx`."""

import sys

from sdonnx.cli import main

sys.exit(main())

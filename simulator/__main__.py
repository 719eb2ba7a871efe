"""``python -m simulator``: run the simulated Ollama server."""

import sys

from simulator.cli import main

sys.exit(main())

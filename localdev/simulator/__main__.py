"""``python -m localdev.simulator``: run the simulated Ollama server."""

import sys

from localdev.simulator.cli import main

sys.exit(main())

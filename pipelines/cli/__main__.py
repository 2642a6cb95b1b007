"""`python -m pipelines.cli`: the navit-pack command."""
import sys

from pipelines.cli import main

sys.exit(main())

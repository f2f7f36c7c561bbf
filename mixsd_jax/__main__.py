import sys

from mixsd_jax.cli import main

sys.exit(main())

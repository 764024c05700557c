"""`python -m sketchwalk`: the same CLI as the `sketchwalk` console script."""
import sys

from sketchwalk.cli import main

sys.exit(main())

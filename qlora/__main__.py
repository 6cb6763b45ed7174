"""`python -m qlora ...` (torchrun needs a module entry point)."""
import sys

from .cli import main

sys.exit(main())

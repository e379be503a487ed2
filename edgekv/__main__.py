"""`python -m edgekv` runs the command line."""

from .cli import main

main()

"""`python -m carspotter …` (also what `torchrun -m carspotter train …` runs)."""

from carspotter.cli import main

if __name__ == "__main__":
    main()

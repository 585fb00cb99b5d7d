"""Entry point: `python -m embedder.synth SUBCOMMAND ...`."""
from embedder.synth.cli import main

if __name__ == "__main__":
    main()

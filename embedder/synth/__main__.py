"""Entry point: `python -m embedder.synth SUBCOMMAND ...`."""
from embedder.synth.cli import main

if __name__ == "__main__":
    from embedder.cpu_tuning import tune_command

    tune_command()   # this process is ours: the CPU tuning (embedder/cpu_tuning.py)
    main()

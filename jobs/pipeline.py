"""`python -m jobs.pipeline --config configs/demo.yaml`: all stages in order, resumable."""
import sys

if __name__ == "__main__":
    from definemed.cli import main

    sys.argv = [sys.argv[0], "pipeline", *sys.argv[1:]]
    main()

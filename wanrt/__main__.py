"""`python -m wanrt ...`, the same as the `wanrt` command (torchrun needs a module to run)."""

from wanrt.cli.app import main

if __name__ == "__main__":
    main()

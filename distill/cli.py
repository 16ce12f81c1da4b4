"""``python -m distill.cli`` (and ``accelerate launch -m distill.cli ...``): the command line lives in
:mod:`distill.app.cli`."""

from distill.app.cli import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    main()

"""Train the demo model: a thin wrapper of `python -m nvlm_export.demo.train` (see docs/demo.md)."""

from nvlm_export.demo.train import main

if __name__ == "__main__":
    main()

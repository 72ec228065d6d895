"""`python -m sslkernels.train METHOD ...`: see sslkernels/train/__init__.py."""
from . import main

if __name__ == "__main__":
    main()

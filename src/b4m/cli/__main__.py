"""``python -m b4m.cli …``, ``accelerate launch -m b4m.cli …``, ``torchrun -m b4m.cli …``."""

from .app import main

if __name__ == "__main__":
    main()

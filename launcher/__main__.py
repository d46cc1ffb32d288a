"""``python -m launcher``: the same as the ``launcher`` console script."""
from launcher.cli import main_entry

if __name__ == "__main__":
    main_entry()

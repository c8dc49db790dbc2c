"""``python -m tenkibox ...`` is the ``tenki`` command (the SDK starts the local server so)."""

from tenkibox.cli.main import main

if __name__ == "__main__":
    main()

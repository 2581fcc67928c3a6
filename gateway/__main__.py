"""``python -m gateway``: the same as ``vqueue gateway``."""

from producer.cli import main

if __name__ == "__main__":
    import sys

    sys.argv[1:1] = ["gateway"]
    main()

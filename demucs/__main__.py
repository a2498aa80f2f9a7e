"""`python -m demucs` runs the separation command."""
from .separate import main

if __name__ == "__main__":
    main()

"""python -m slim.paper: the index of reproduce.sh's artefacts (see slim.paper.index)."""

from .index import main

if __name__ == "__main__":
    main()

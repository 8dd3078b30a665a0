"""python -m slim.paper: the index of reproduce.sh's artefacts (see slim.paper.index); errors in one line."""

from .index import run

if __name__ == "__main__":
    run()

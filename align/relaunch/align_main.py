"""``align`` as a script, which ``align run --launcher accelerate`` has accelerate start in each process.

A script's directory, not the working directory, begins its ``sys.path``: run as ``python -m align``
from a directory holding a folder named ``align/`` (the parent of a clone), the processes imported
that folder instead of the installed package and died with an ``ImportError``. This directory holds
nothing else, so nothing in it can shadow a module either.
"""

from align.cli import main

if __name__ == "__main__":
    main()

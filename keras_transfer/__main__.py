"""``python -m keras_transfer`` is ``ktransfer`` (for machines where the package is on PYTHONPATH only)."""

from keras_transfer.entry import main

main()

import sys

from dicom_node.cli import main

# Guarded: the inference worker is started with multiprocessing's "spawn", which imports
# this module again in the child.
if __name__ == "__main__":
    sys.exit(main())

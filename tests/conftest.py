import os
import sys

# The tests import gbg, data_lt and train from the repository root, whatever the working folder.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

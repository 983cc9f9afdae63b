"""Folders the programs default to, inside the repository wherever it is run from."""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_ROOT = os.path.join(REPO_ROOT, "refer", "data")
DEFAULT_OUTPUT_DIR = os.path.join(REPO_ROOT, "checkpoints")

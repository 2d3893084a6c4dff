"""The embedded tiny model shipped inside the package."""
import pathlib

TINY_MODEL_DIR = pathlib.Path(__file__).parent / "tiny"
TINY_MODEL_NAME = "builtin:tiny"

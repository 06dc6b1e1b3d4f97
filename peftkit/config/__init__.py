from peftkit.config.loader import load_recipe  # noqa: F401

"""Packaged run configs (`get_config()` files): base (every field), faces, cats, art, tiny."""

"""Packaged run configs (`get_config()` files): base (every field), faces, faces_sdxl, cats, art, tiny."""

"""The HTTP side: the WSGI app (health, metrics, JSON API), the worklist pages and their text."""

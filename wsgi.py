"""gunicorn entry point: ``gunicorn --config config/gunicorn.py wsgi:app``."""
from relay.app import create_app

app = create_app()

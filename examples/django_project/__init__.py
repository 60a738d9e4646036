"""A one-view Django project whose WSGI application is wrapped in oxypy blocks."""

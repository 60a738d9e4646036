"""Minimal Django settings: no database, CSRF on, ready to run behind oxypy.

Behind a proxy Django needs to know the address the client used, or its CSRF
origin check refuses every POST: ``Forward`` sends the upstream's own name in
``Host`` (as nginx does by default) and the client's in ``X-Forwarded-Host``,
which ``USE_X_FORWARDED_HOST`` makes Django read.  Only safe when the app is
reachable through the proxy alone (oxypy replaces a client's forged value).
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "django_project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = ["django.middleware.csrf.CsrfViewMiddleware"]
DATABASES: dict[str, dict[str, str]] = {}
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates"}]
USE_TZ = True
WSGI_APPLICATION = "django_project.wsgi.application"

# Behind oxypy: the client's host comes in X-Forwarded-Host (Forward always
# sends it and drops a client's forged one), the scheme in X-Forwarded-Proto.
USE_X_FORWARDED_HOST = True
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Or list the public origins instead of trusting X-Forwarded-Host:
# CSRF_TRUSTED_ORIGINS = ["https://www.example.com"]

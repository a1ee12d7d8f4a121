"""The WSGI application named by $STACK_WSGI_APP (`module:attribute`), for gunicorn.

Some OpenStack services (Keystone) parse sys.argv with oslo.config when their application
is built, and gunicorn's own arguments are still there; they are not the service's.
"""
import importlib
import os
import sys

sys.argv = sys.argv[:1]
_module, _attribute = os.environ["STACK_WSGI_APP"].split(":")
application = getattr(importlib.import_module(_module), _attribute)

"""The read-only operator dashboard: ``sessions dashboard`` serves it with uvicorn.

``app`` builds the ASGI application, ``params`` validates query strings, ``reads`` opens
the read-only store and counts what the store has no call for, ``chart`` lays out the
SVG charts, ``security`` checks the token and sets the browser's rules, ``views`` renders
the pages from ``templates/``, and ``server`` runs it.
"""

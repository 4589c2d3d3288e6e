"""The ``hf-delta`` command line: ``main.py`` holds the parser and the registry of command groups, one module
each (``zoo``, ``compress``, ``bench``, ``serve``, ``demo``); a command's implementation is imported only when it runs.
"""

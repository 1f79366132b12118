"""The names of the on-disk adapter conventions (:mod:`adapters.formats` reads and writes them).

Kept free of torch so that the command line can offer them as choices without importing it.
"""

FORMATS = ("diffusers", "peft", "kohya")

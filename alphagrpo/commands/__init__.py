"""The ``alphagrpo`` commands, one module each with ``add_arguments(parser)`` and ``run(args) -> int``. Commands
sit on top of the library (``alphagrpo.train``, ``alphagrpo.eval``) and nothing below imports them."""

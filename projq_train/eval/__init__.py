"""Evaluation: tasks and their data (``tasks``), batched scoring (``harness``), the models scored
(``models``), tables and plots of the results (``tables``), the ``eval`` and ``report`` commands
(``run``) and a Lightning callback for validate/test (``callback``)."""

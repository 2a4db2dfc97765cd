"""Evaluation: tasks and their data (``tasks``), batched scoring (``harness``), the ``eval`` and
``report`` commands (``run``) and a Lightning callback for validate/test (``callback``)."""

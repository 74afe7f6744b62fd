"""The models' own exception (torch-free, imports nothing): models and their ways of running
(fcmae.sites) raise it in the terms of their own arguments; the CLI says it as one sentence."""


class ModelError(ValueError):
    """A model or a way of running it was asked for something it cannot do; the message says
    what to pass instead."""

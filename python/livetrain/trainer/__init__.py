"""livetrain's trainer service: the process that attaches to an engine's weights and trains them in place.

- ``examples``  what a /train job says, checked and tokenized (and the chat messages check and chat
                rendering engines, the guard and rewording share: ``prompt_ids``, plain text without a template)
- ``service``   the Trainer: the model on the engine's memory, the job queue, checkpoints and rollbacks
- ``protocol``  the Unix-socket protocol between the routes and the trainer, and the one error reply
- ``routes``    the HTTP training routes every engine mounts, forwarding request bodies as bytes
- ``options``   the trainer's command-line options, shared by every launcher
- ``process``   starting, watching and stopping the trainer (and the reference engine) as processes
- ``client``    the HTTP client: ``livetrain train``, and the helper scripts, benchmarks and tests use

``python -m livetrain.trainer`` runs the trainer process (``__main__``). Only ``service`` imports torch:
launchers, routes and clients stay light.
"""

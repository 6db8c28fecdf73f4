"""The engines that serve a model whose weights livetrain trains: ``reference`` (livetrain's own, for the
embedded default model, tests and CPU machines). vLLM is served through the plugin in ``livetrain.vllm``.
Engines sit on the trainer service (livetrain.trainer: its routes, protocol and error replies); no engine
imports another.
"""

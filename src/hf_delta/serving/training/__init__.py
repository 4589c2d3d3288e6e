"""LoRA fine-tuning co-served with inference: jobs and their data (``jobs``), the trainer that adds its
tokens to the engine's steps (``trainer``, implementing ``engine.hooks.StepHook``), and the token budget
that decides how many training tokens each step gets (``budget``)."""

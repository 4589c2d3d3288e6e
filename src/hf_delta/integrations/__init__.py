"""Bridges to other libraries: PEFT LoRA export (``peft``), lm-evaluation-harness (``lm_eval``, ``lm_eval_tasks``)."""

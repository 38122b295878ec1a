"""LoRA adaptation of a VLM on SVP's selected samples (the paper's step 6).

* :mod:`svp.training.presets` — Table 11's recipes as named :class:`~svp.contract.TrainingConfig` s;
* :mod:`svp.training.dataset` — the LLaVA conversation JSONL, read strictly, and the CVQ mix;
* :mod:`svp.training.collator` — chat-template rendering and the answer-only label mask;
* :mod:`svp.training.lora` — the peft LoRA loop that writes the adapter artifact.
"""

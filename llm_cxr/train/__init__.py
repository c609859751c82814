"""Training: typed configs and shipped presets (:mod:`~llm_cxr.train.config`, ``presets/``), example making
(:mod:`~llm_cxr.train.examples`), batching (:mod:`~llm_cxr.train.batching`), the loop (:mod:`~llm_cxr.train.loop`),
a multimodal stage (:mod:`~llm_cxr.train.stage`), LoRA (:mod:`~llm_cxr.train.lora`), the add-ons trained apart from
the LM (:mod:`~llm_cxr.train.addons`) and the embedded base LM (:mod:`~llm_cxr.train.base`)."""

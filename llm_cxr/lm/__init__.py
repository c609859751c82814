"""Everything inference needs: the image-token vocabulary (:mod:`~llm_cxr.lm.tokens`), prompts and questions
(:mod:`~llm_cxr.lm.prompts`), the sequence type and the one tokenisation (:mod:`~llm_cxr.lm.sequence`), the one
forward pass (:mod:`~llm_cxr.lm.model`), the add-ons (:mod:`~llm_cxr.lm.addons`), run folders
(:mod:`~llm_cxr.lm.run`) and constrained generation (:mod:`~llm_cxr.lm.generation`). Nothing here imports
:mod:`llm_cxr.train`."""

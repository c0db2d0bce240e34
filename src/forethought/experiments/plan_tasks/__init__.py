"""Where does a model plan? Tasks whose future is fixed before it is written (rhyme, answer, response, code,
article), each measured the same way: the model's behaviour first, then a probe at the planning site against a
baseline that reads the same prompt text, then causal tests (steering, patching) at the site.

`types` holds the records every stage shares; `generate` the batched greedy decoding with the site's states
captured (or edited) during the prompt's pass."""
